"""A tiny reference decoder for checking a trained value file without the Engine:
greedy argmax(base_logits + alpha * value_logits), both models in llama-cpp-python, the
whole sequence re-evaluated each step (slow, obviously correct; numpy only, no torch).

    text = greedy_fused("gemma3-270m", "value.ivl.gguf", "User: Hi\\n\\nAssistant:", 32)
"""

from __future__ import annotations

import numpy as np

from ..models import resolve_model


def greedy_fused(base: str, value: str | None, prompt: str, max_tokens: int = 48,
                 alpha: float = 1.0, n_ctx: int = 512) -> str:
    import llama_cpp

    from ..backend import safe_llama_params

    with safe_llama_params():
        base_llm = llama_cpp.Llama(str(resolve_model(base)), n_ctx=n_ctx, verbose=False)
        value_llm = (llama_cpp.Llama(str(resolve_model(value)), n_ctx=n_ctx, verbose=False)
                     if value else None)
    tokens = base_llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = _last_logits(base_llm, tokens + out)
        if value_llm is not None:
            logits = logits + alpha * _last_logits(value_llm, tokens + out)
        token = int(np.argmax(logits))
        if token == base_llm.token_eos():
            break
        out.append(token)
        if b"\nUser:" in base_llm.detokenize(out):
            break
    return base_llm.detokenize(out).decode("utf-8", errors="replace")


def _last_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)          # without logits_all only the last position has logits
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
