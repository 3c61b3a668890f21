"""TrainConfig: every training default in one place (no torch import here, so the CLI can
build and validate a config before paying for `import torch`).

    cfg = TrainConfig(base="smollm2-135m", data=Path("data/arith_train.jsonl"),
                      out_dir=Path("runs/arith"), init="pruned:4", max_steps=200)
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import ConfigError

_INIT_RE = re.compile(r"^(auto|pretrained|fresh|pruned:[1-9][0-9]*)$")


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train against ---------------------------------------------------------
    base: str = "gemma3-270m"          # frozen base: known model name, .gguf file or HF folder
    data: Path = Path("data/chat_train.jsonl")  # demonstrations (JSONL: messages or prompt/response)
    out_dir: Path = Path("runs/value")  # checkpoint folder (created; holds model + state)

    # --- the value network ---------------------------------------------------------------
    # auto = "pretrained" when ivl-convert can write the base's arch (llama, qwen2, gemma3): a
    # trainable copy of the base, as the paper did with TinyLlama; else "fresh". pruned:K keeps
    # the first K layers of the copy.
    init: str = "auto"
    init_from: str | None = None       # model to copy for pretrained/pruned (default: the base)
    fresh_hidden: int = 256            # fresh llama: hidden size (262k-vocab logits dominate cost)
    fresh_layers: int = 2              # fresh llama: decoder layers
    fresh_heads: int = 4               # fresh llama: attention heads (head_dim = hidden / heads)
    fresh_kv_heads: int = 2            # fresh llama: KV heads (GQA, as SmolLM2/Gemma do)
    fresh_intermediate: int = 768      # fresh llama: MLP width (3x hidden)
    fresh_embed_from_base: bool = True  # init fresh embeddings from the base's (PCA if narrower)

    # --- objective -------------------------------------------------------------------------
    norm_weight: float = 1.0           # weight of mean(|value_logits|); official code uses 1
    norm_positions: str = "all"        # "all" real tokens (official: prompt too) | "response"
    max_len: int = 256                 # tokens per example; longer examples are truncated

    # --- optimisation (official recipe: AdamW, lr 1e-4, cosine, 1 % warm-up, wd 0.01) --------
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.01         # fraction of steps with linear warm-up
    min_lr_ratio: float = 0.0          # cosine floor as a fraction of learning_rate
    batch_size: int = 8                # examples per micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    max_steps: int | None = None       # optimizer steps; None = epochs * steps per epoch
    epochs: float = 3.0                # used when max_steps is None (official: 3)
    max_seconds: float | None = None   # stop (and save) after this wall time; None = no limit
    pause_after: int | None = None     # stop (and save, resumable) after this optimizer step:
                                       # training in sessions, e.g. on preemptible machines
    grad_clip: float = 1.0             # global grad-norm clip; 0 disables
    seed: int = 0

    # --- evaluation and checkpoints ----------------------------------------------------------
    eval_fraction: float = 0.05        # held-out share of the data (at least 1 example)
    eval_every: int = 50               # optimizer steps between evaluations; 0 = only at the end
    save_every: int = 0                # steps between checkpoints; 0 = only at the end
    resume: bool = False               # continue from out_dir/state.pt (same config)

    # --- modes and resources -------------------------------------------------------------------
    full_finetune: bool = False        # reference mode: fine-tune the base itself (no value net)
    train_layers: int = 0              # full_finetune only: train just the last N decoder layers
                                       # and the final norm (partial FT when AdamW on every
                                       # weight does not fit in memory); 0 = every weight
    device: str = "auto"               # auto = cuda when available, else cpu
    threads: int = 2                   # torch CPU threads (shared laptops: keep it small)
    check_tokenizer: bool = True       # compare the HF tokenizer with the GGUF one on sample text
    grad_checkpointing: bool = False   # recompute the value net's layer activations in backward
                                       # (less memory, ~30 % more compute)
    precision: str = "auto"            # auto = bf16 autocast + bf16 base on CUDA, fp32 on CPU
    fsdp: bool = False                 # under torchrun: shard the trained network, its gradients
                                       # and AdamW state over the processes (FSDP2) instead of
                                       # replicating them (DDP)

    def __post_init__(self) -> None:
        checks = [
            (bool(_INIT_RE.match(self.init)), "init must be auto | pretrained | fresh | pruned:K"),
            (self.fresh_hidden > 0 and self.fresh_layers > 0, "fresh_hidden/fresh_layers must be > 0"),
            (self.fresh_heads > 0 and self.fresh_hidden % self.fresh_heads == 0,
             "fresh_hidden must be a multiple of fresh_heads"),
            (self.fresh_kv_heads > 0 and self.fresh_heads % self.fresh_kv_heads == 0,
             "fresh_heads must be a multiple of fresh_kv_heads"),
            ((self.fresh_hidden // max(self.fresh_heads, 1)) % 2 == 0, "head_dim must be even (RoPE)"),
            (math.isfinite(self.norm_weight) and self.norm_weight >= 0, "norm_weight must be >= 0"),
            (self.norm_positions in ("all", "response"), "norm_positions must be all | response"),
            (self.max_len >= 8, "max_len must be >= 8"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size/grad_accum must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.epochs > 0, "epochs must be > 0"),
            (self.max_seconds is None or self.max_seconds > 0, "max_seconds must be > 0"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (0 <= self.eval_fraction < 1, "eval_fraction must be in [0, 1)"),
            (self.eval_every >= 0 and self.save_every >= 0, "eval_every/save_every must be >= 0"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             "device must be auto | cpu | cuda[:N]"),
            (self.threads >= 1, "threads must be >= 1"),
            (self.train_layers >= 0, "train_layers must be >= 0"),
            (self.train_layers == 0 or self.full_finetune, "train_layers needs full_finetune"),
            (self.pause_after is None or self.pause_after >= 1, "pause_after must be >= 1"),
            (self.precision in ("auto", "fp32", "bf16"), "precision must be auto | fp32 | bf16"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid training setting: {message}")
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out_dir", Path(self.out_dir))

    def with_(self, **changes) -> "TrainConfig":
        return replace(self, **changes)

    def to_json(self) -> dict:
        out = asdict(self)
        out["data"] = str(self.data)
        out["out_dir"] = str(self.out_dir)
        return out

    # Fields that may differ between a run and its resumption without changing the result.
    RESUMABLE_CHANGES = ("resume", "max_seconds", "pause_after", "device", "threads", "out_dir",
                         "eval_every", "save_every", "check_tokenizer", "grad_checkpointing",
                         "fsdp")
