"""`ivl train`, `ivl convert`, `ivl inspect`: making and looking at value networks.

    ivl train --base smollm2-135m --data data/arith_train.jsonl --out runs/arith --steps 200
    ivl train --recipe default --out ~/.cache/ivl-local/default-value
    ivl convert runs/arith -o arith.ivl.gguf --type q8_0
    ivl inspect arith.ivl.gguf

torch is imported only when training actually starts (inside `ivl_local.train.api`);
conversion and inspection never import it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import ConfigError, ModelFileError, ModelNotFoundError
from ._common import one_line_warnings, user_errors

RECIPES = ("default",)


def _need_train_extra(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ModelNotFoundError(
            f"{what} needs PyTorch (the 'train' extra): {sys.executable} -m pip install 'ivl-local[train]'")


# Flag name -> TrainConfig field, for the flags whose names differ from the field.
TRAIN_FLAG_FIELDS = {"out": "out_dir", "steps": "max_steps", "lr": "learning_rate"}


def build_train_config(**flags: Any):
    """TrainConfig from the flags the user gave; the rest keep TrainConfig's defaults."""
    from ..train.config import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    changes = {}
    for flag, v in flags.items():
        if v is None:
            continue
        name = TRAIN_FLAG_FIELDS.get(flag, flag)
        assert name in known, f"flag {flag} maps to no TrainConfig field"
        changes[name] = v
    return TrainConfig(**changes)


def train(
    base: Annotated[Optional[str], typer.Option(help="Frozen base: known model name, .gguf file or HF folder. Default gemma3-270m.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Demonstrations (JSONL: messages or prompt/response).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Checkpoint folder (created).")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="A ready-made recipe: 'default' trains the default value network.")] = None,
    init: Annotated[Optional[str], typer.Option(help="Value net init: auto | pretrained | fresh | pruned:K.", rich_help_panel="Value network")] = None,
    init_from: Annotated[Optional[str], typer.Option(help="Model copied for pretrained/pruned init (default: the base).", rich_help_panel="Value network")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default: --epochs over the data).", rich_help_panel="Optimisation")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Epochs when --steps is not given (default 3).", rich_help_panel="Optimisation")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default 1e-4).", rich_help_panel="Optimisation")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per micro-batch (default 8).", rich_help_panel="Optimisation")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per step (default 1).", rich_help_panel="Optimisation")] = None,
    norm_weight: Annotated[Optional[float], typer.Option(help="Weight of mean(|value logits|) (default 1).", rich_help_panel="Optimisation")] = None,
    max_len: Annotated[Optional[int], typer.Option(help="Tokens per example (default 256).", rich_help_panel="Optimisation")] = None,
    max_seconds: Annotated[Optional[float], typer.Option(help="Stop (and save) after this wall time.", rich_help_panel="Optimisation")] = None,
    pause_after: Annotated[Optional[int], typer.Option(help="Stop (and save) after this optimizer step; continue with --resume.", rich_help_panel="Checkpoints")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed (default 0).", rich_help_panel="Optimisation")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Steps between evaluations (0 = at the end).", rich_help_panel="Checkpoints")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints (0 = at the end).", rich_help_panel="Checkpoints")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue from --out's saved state.", rich_help_panel="Checkpoints")] = None,
    full_finetune: Annotated[Optional[bool], typer.Option("--full-finetune", help="Reference mode: fine-tune the base itself.", rich_help_panel="Modes")] = None,
    train_layers: Annotated[Optional[int], typer.Option(help="With --full-finetune: train only the last N decoder layers and the final norm (partial FT, for bases too big for full AdamW).", rich_help_panel="Modes")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda[:N].", rich_help_panel="Modes")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (default 2; per process under torchrun).", rich_help_panel="Modes")] = None,
    grad_checkpointing: Annotated[Optional[bool], typer.Option("--grad-checkpointing", help="Recompute the value net's activations in backward: less memory, more compute.", rich_help_panel="Modes")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 autocast and a bf16 base on CUDA, fp32 on CPU) | fp32 | bf16.", rich_help_panel="Modes")] = None,
    fsdp: Annotated[Optional[bool], typer.Option("--fsdp", help="Under torchrun: shard the value net, its gradients and AdamW state over the processes (FSDP) instead of replicating them (DDP).", rich_help_panel="Modes")] = None,
    check_tokenizer: Annotated[Optional[bool], typer.Option("--check-tokenizer/--no-check-tokenizer", help="Compare transformers' tokenizer with the GGUF's on sample text first (default on).", rich_help_panel="Modes")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False,
) -> None:
    """Train a value network against a frozen base (needs the 'train' extra)."""
    with user_errors(debug), one_line_warnings():
        if recipe is not None:
            if recipe not in RECIPES:
                raise ConfigError(f"unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")
            if out is None:
                from .chat import default_value_dir

                out = default_value_dir()
            _need_train_extra("training")
            from ..train.api import default_recipe

            result = default_recipe(out)
            print(result if result is not None else out)
            return
        cfg = build_train_config(base=base, data=data, out=out, init=init, init_from=init_from,
                                 steps=steps, epochs=epochs, lr=lr, batch_size=batch_size,
                                 grad_accum=grad_accum, norm_weight=norm_weight, max_len=max_len,
                                 max_seconds=max_seconds, seed=seed, eval_every=eval_every,
                                 save_every=save_every, resume=resume, full_finetune=full_finetune,
                                 train_layers=train_layers, pause_after=pause_after,
                                 device=device, threads=threads, grad_checkpointing=grad_checkpointing,
                                 precision=precision, fsdp=fsdp, check_tokenizer=check_tokenizer)
        if not cfg.data.is_file():
            raise ModelFileError(f"no such demonstrations file: {cfg.data}")
        _need_train_extra("training")
        from ..train.api import train as run_training

        from ..train.dist import launched_rank

        result = run_training(cfg)
        if launched_rank() == 0:          # under torchrun: one line, from rank 0
            print(result if result is not None else cfg.out_dir)


class OutType(str, Enum):
    f32 = "f32"
    f16 = "f16"
    q8_0 = "q8_0"


def convert(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder written by 'ivl train', or a Hugging Face causal-LM folder (llama, qwen2, gemma3).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Value file to write (.ivl.gguf).")],
    out_type: Annotated[OutType, typer.Option("--type", "-t", help="Tensor type of the weights.")] = OutType.f16,
    base_gguf: Annotated[Optional[str], typer.Option(
        "--base", "--base-gguf",
        help="The training base (.gguf or known name): its tokenizer is copied. Required for a "
             "Hugging Face folder; for an ivl train checkpoint only if the base moved.")] = None,
    allow_other_vocab: Annotated[bool, typer.Option(
        "--allow-other-vocab", help="Hugging Face folder whose vocabulary is not --base's: the value "
        "file carries its own (--vocab-gguf) and steers the base through a token map.")] = False,
    vocab_gguf: Annotated[Optional[str], typer.Option(
        help="With --allow-other-vocab: a .gguf of the folder's own vocabulary (e.g. its base model).")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False,
) -> None:
    """Convert a training checkpoint or a Hugging Face model folder into a .ivl.gguf value file (no torch needed)."""
    with user_errors(debug), one_line_warnings():
        if not checkpoint.exists():
            raise ModelFileError(f"no such checkpoint: {checkpoint}")
        import ivl_convert

        result = ivl_convert.convert_checkpoint(checkpoint, out, out_type.value,
                                                progress=sys.stderr.isatty(), base_gguf=base_gguf,
                                                allow_other_vocab=allow_other_vocab, vocab_gguf=vocab_gguf)
        print(result if result is not None else out)


def inspect(
    file: Annotated[Path, typer.Argument(help="A .ivl.gguf value file (or any GGUF).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw fields as JSON.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False,
) -> None:
    """Show a value file's ivl.* metadata: format, training base, recipe, default alpha."""
    with user_errors(debug), one_line_warnings():
        import ivl_convert      # reads through ivl_local.valuefile: a bad file is one error line

        info = ivl_convert.inspect_value_file(file)
    if as_json:
        print(json.dumps(info, indent=2, default=str, ensure_ascii=False))
        return
    from rich.console import Console

    Console(highlight=False).print(info_table(info, str(file)))


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"    # f32 metadata: 9.999999747e-05 reads as 0.0001
    if isinstance(value, (list, tuple)):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def info_table(info: dict, title: str):
    """Top-level fields first, then one section per nested dict (ivl, general, hparams, ...)."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in info.items():
        if not isinstance(value, dict):
            table.add_row(str(key), _shown(value))
    for key, value in info.items():
        if isinstance(value, dict):
            table.add_row("", "")
            table.add_row(f"[cyan]{key}[/]", "")
            for sub, v in value.items():
                table.add_row(f"  {sub}", _shown(v))
    return table
