"""Entry points of the training stage (what `ivl-train` calls).

    from ivl_local.train.api import TrainConfig, train, default_recipe
    ckpt_dir = train(TrainConfig(base="smollm2-135m", data=Path("data/arith_train.jsonl"),
                                 out_dir=Path("runs/arith"), init="pruned:4", max_steps=200))
    value_file = default_recipe()   # Gemma 3 270M chat value net -> cache_dir()/default-value
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

from .config import TrainConfig

__all__ = ["TrainConfig", "train", "evaluate_checkpoint", "default_recipe", "DEFAULT_RECIPE",
           "default_data_path"]


def _log(progress: bool):
    def log(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)
    return log


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train (or resume) a value network; returns the checkpoint folder.

    Under torchrun / accelerate launch (RANK, WORLD_SIZE, ... in the environment) every
    process calls this; they train one network with DDP and rank 0 alone logs and saves.

    Raises DataError (file:line), ConfigError, ModelFileError, CheckpointError, and
    TrainingInterrupted after Ctrl-C (a resumable checkpoint is saved first)."""
    from . import dist as distributed
    from .trainer import pick_device, run, setup  # torch is imported here, not when the CLI starts

    d = distributed.start(use_cuda=pick_device(cfg.device).type == "cuda")
    try:
        log = _log(progress and d.main)
        return run(setup(cfg, log=log, dist=d), progress=progress and d.main, log=log)
    finally:
        distributed.stop(d)


def evaluate_checkpoint(ckpt_dir: Path, data: Path) -> dict:
    """The trainer's held-out measures (eval_ce, eval_token_acc, ...) of a saved value network
    on every example of `data`, with the base, recipe and sequence length it was trained with.
    Raises CheckpointError for a folder that is not a checkpoint, DataError for bad data."""
    from . import checkpoint as ckpt
    from .trainer import evaluate, setup

    saved = ckpt.load_meta(Path(ckpt_dir)).get("train_config", {})
    known = {f.name for f in fields(TrainConfig)}
    settings = {k: v for k, v in saved.items() if k in known}
    settings.update(data=Path(data), out_dir=Path(ckpt_dir), resume=False, eval_fraction=0.0,
                    check_tokenizer=False, grad_checkpointing=False, fsdp=False)
    s = setup(TrainConfig(**settings), log=lambda message: None)
    ckpt.load_weights_into(s.model, Path(ckpt_dir))
    s.eval_examples, s.train_examples = s.train_examples, []
    return evaluate(s)


def default_data_path() -> Path:
    """The chat demonstrations shipped with ivl-local (package data or the checkout's data/)."""
    from ..datasets import data_path

    return data_path("chat_train.jsonl")


# The default value network: teaches Gemma 3 270M *base* to answer in the fallback chat
# format, as the paper initialises value nets: a trainable copy of the base's first 4 layers.
# Measured against the fresh 2-layer llama it replaced, on held-out chat prompts
# (benchmarks/chat_value.py, docs/results/chat-value): held-out CE 0.838 vs 0.931, token
# accuracy 0.865 vs 0.802, answers with the asked fact 17/40 vs 11/40; it costs 1.6x the
# training time and 6.3 GB peak RSS (3.4 GB).
DEFAULT_RECIPE = dict(
    base="gemma3-270m",
    init="pruned:4",
    learning_rate=1e-4,      # the official lr for a pre-trained copy
    warmup_ratio=0.03,
    batch_size=8,
    max_len=160,
    epochs=1.0,              # one pass: 41 steps
    max_seconds=660.0,       # hard cap so the whole recipe (load + train + convert) fits 15 min
    eval_every=0,
    check_tokenizer=False,   # verified in tests; costs ~30 s on the 262k vocabulary
)


# Estimated, not yet timed on an idle machine: the fresh recipe's whole first run (load, train,
# convert) took 5 min 07 s on 2 idle cores (measured); the pruned copy's training steps cost
# 1.63x the fresh net's (0.019 vs 0.031 steps/s, one after the other on the shared machine).
# The first run, idle, 2 cores, measured end to end (load, 41 steps, convert, first answer):
# 4 min 18 s on a Xeon with AVX-512 (Dec 2026); ~8 min on the older 2-core machine before it
# (the fresh recipe's measured 5 min 07 s there x 1.63, the measured ratio of the two recipes).
RECIPE_IDLE_SECONDS = (258, 500)
RECIPE_THREADS = 2           # TrainConfig.threads: more cores do not make it faster


def recipe_estimate(cores: int, load: float) -> str:
    """An honest duration for the first run, said before it starts: the idle range, its upper
    end stretched by the share of RECIPE_THREADS cores the machine's load leaves free, and never
    above the recipe's time cap (training then stops early and keeps what it learned)."""
    low_min, idle_min = (seconds / 60 for seconds in RECIPE_IDLE_SECONDS)
    cap_min = (DEFAULT_RECIPE["max_seconds"] + 60) / 60        # + loading and converting
    free = max(0.25, min(cores, RECIPE_THREADS) - max(0.0, load - max(0, cores - RECIPE_THREADS)))
    expected = min(cap_min, idle_min * RECIPE_THREADS / min(free, RECIPE_THREADS))
    text = f"about {low_min:.0f}-{idle_min:.0f} minutes on {RECIPE_THREADS} idle cores"
    if expected > idle_min * 1.2:
        text += (f"; this machine is busy (load {load:.1f} on {cores} cores), so expect up to "
                 f"{expected:.0f}")
        if expected >= cap_min:
            text += " (training stops at its time cap and keeps what it learned by then)"
    return text


def default_recipe(out_dir: Path | None = None, progress: bool = True, out_type: str = "q8_0",
                   **overrides) -> Path:
    """Train + convert the default value net; returns the .ivl.gguf path
    (default: ivl_local.models.cache_dir()/"default-value"/gemma3-270m-chat.ivl.gguf)."""
    from ivl_convert import convert_checkpoint

    from ..models import cache_dir

    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / "default-value"
    settings = {**DEFAULT_RECIPE, "data": default_data_path(), "out_dir": out_dir / "checkpoint",
                **overrides}
    ckpt_dir = train(TrainConfig(**settings), progress=progress)
    return convert_checkpoint(ckpt_dir, out_dir / "gemma3-270m-chat.ivl.gguf", out_type=out_type,
                              progress=progress)
