"""How a configuration produces answers: the Engine (GGUF files), or torch for a full
fine-tune llama.cpp cannot load. Both answer a batch of conversations greedily.

    runner = make_runner(config, base=..., value=..., token_map=..., seed=0)
    runner.alpha = 0.5
    answers = runner.answer_all([example.prompt_messages for example in examples], max_tokens=16)
    runner.close()
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

from ..config import GREEDY, default_threads


class Runner(Protocol):
    alpha: float

    def answer_all(self, conversations: list[list[dict]], max_tokens: int,
                   advance: Callable[[], None] = lambda: None) -> list[str]: ...

    def close(self) -> None: ...


class EngineRunner:
    """Greedy chat through ivl_local.Engine (base alone when value is None)."""

    def __init__(self, base: Path, value: Path | None, token_map: Path | None, seed: int, n_ctx: int = 256,
                 threads: int | None = None, value_prompt: str = "own", terms=(), map_mode: str = "raw"):
        from ..engine import Engine

        self.engine = Engine(str(base), None if value is None else str(value), alpha=1.0, n_ctx=n_ctx,
                             terms=terms,
                             n_threads=threads, seed=seed, value_prompt=value_prompt, map_mode=map_mode,
                             token_map=None if token_map is None else str(token_map))

    @property
    def alpha(self) -> float:
        return self.engine.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.engine.alpha = float(value)

    def answer_all(self, conversations, max_tokens, advance=lambda: None) -> list[str]:
        """Each answer from an empty cache: with the previous prompt's prefix reused, the prompt
        is decoded in other batches, whose logits differ in the last bits, and greedy near-ties
        flipped: 13-23 of 80 answers differed between a run of 80 prompts and one of 320 that
        held them. Now an example's answer does not depend on which examples came before."""
        answers = []
        for messages in conversations:
            self.engine.clear_cache()
            reply = self.engine.chat(messages, max_tokens=max_tokens, sampling=GREEDY)
            answers.append(reply["choices"][0]["message"]["content"])
            advance()
        return answers

    def close(self) -> None:
        self.engine.close()


class TorchRunner:
    """A torch checkpoint (full fine-tune of a non-llama base), answered in a child process."""

    def __init__(self, checkpoint: Path, base_gguf: Path, threads: int = 2):
        self.checkpoint, self.base_gguf, self.threads = Path(checkpoint), Path(base_gguf), threads
        self.alpha = 1.0   # no value network: alpha has no meaning here

    def answer_all(self, conversations, max_tokens, advance=lambda: None) -> list[str]:
        from .artifacts import run_job

        result = run_job("generate", {"checkpoint": str(self.checkpoint), "base_gguf": str(self.base_gguf),
                                      "conversations": conversations, "max_tokens": max_tokens,
                                      "threads": self.threads, "out_dir": str(self.checkpoint)})
        for _ in conversations:
            advance()
        return result["answers"]

    def close(self) -> None:
        pass


def make_runner(base: Path, value: Path | None, token_map: Path | None, seed: int,
                torch_base_gguf: Path | None = None, threads: int | None = None,
                value_prompt: str = "own", terms=(), n_ctx: int = 256, map_mode: str = "raw") -> Runner:
    """A folder as base means a torch checkpoint (its GGUF tokenizer comes from torch_base_gguf)."""
    threads = threads or default_threads()
    if Path(base).is_dir():
        assert value is None and not terms and torch_base_gguf is not None
        return TorchRunner(base, torch_base_gguf, threads)
    return EngineRunner(base, value, token_map, seed, n_ctx=n_ctx, threads=threads, value_prompt=value_prompt,
                        terms=terms, map_mode=map_mode)
