"""Does transformers' tokenizer (rebuilt from the GGUF) split text like llama.cpp does?

Training tokenizes with llama.cpp (the runtime's tokenizer), so a disagreement does not
corrupt training; it is reported because it means the torch base may be reading slightly
different token sequences in other tools (e.g. an HF-based evaluation).
"""

from __future__ import annotations

from .basefile import BaseGGUF

SAMPLES = (
    "Hello, world!",
    "User: What is 12 + 7?\n\nAssistant: 19",
    "  Leading spaces, tabs\tand\nnew lines.",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "Ünïcödé — “quotes”, emoji 🙂 and 中文.",
    "def add(a, b):\n    return a + b\n",
)


def compare_tokenizers(base: BaseGGUF, samples=SAMPLES) -> dict:
    """{'samples': n, 'mismatches': k, 'first': (text, gguf_ids, hf_ids) | None}."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf = AutoTokenizer.from_pretrained(str(base.path.parent), gguf_file=base.path.name)
    mismatches, first = 0, None
    for text in samples:
        gguf_ids = base.tokenize(text, add_bos=False)
        hf_ids = hf(text, add_special_tokens=False)["input_ids"]
        if list(gguf_ids) != list(hf_ids):
            mismatches += 1
            first = first or (text, gguf_ids, hf_ids)
    return {"samples": len(samples), "mismatches": mismatches, "first": first}
