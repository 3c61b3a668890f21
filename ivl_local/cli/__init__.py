"""Command-line interface: Typer apps `ivl`, `ivl-chat`, `ivl-train`, `ivl-convert`.

The CLI is the only place that catches `ivl_local.errors.IVLError`: it turns each into one
`error: ...` line on stderr and a non-zero exit code. Heavy modules (the engine, llama.cpp,
torch) are imported inside the commands that need them, so `ivl --help` is instant and
`ivl chat` never imports torch.
"""
