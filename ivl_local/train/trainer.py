"""The training loop: frozen base + value network, AdamW with warm-up + cosine, gradient
accumulation, held-out evaluation, checkpoints, resume, Ctrl-C; one process or several under
torchrun (DDP; see ivl_local.train.dist for the contract).

Reads top-down: setup() builds everything from a TrainConfig, run() loops over optimizer
steps, each the sum of `grad_accum` global micro-batches (each rank computes its share).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import random
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, IVLError
from ..progress import Heartbeat, stderr_isatty
from . import checkpoint as ckpt
from . import dist as distributed
from .basefile import BaseGGUF
from .config import TrainConfig
from .data import IGNORE, Example, data_digest, load_examples, split_eval
from .loss import LossParts, fused_loss, next_token_targets, norm_mask_of
from .model import build_value_net, count_parameters, freeze, load_causal_lm


class TrainingInterrupted(IVLError):
    """Ctrl-C during training; a resumable checkpoint was saved first."""

    exit_code = 130


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):   # not glibc (macOS, musl, Windows)
        return None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere).
    glibc keeps freed blocks of up to 32 MB inside its heap, and PyTorch's CPU tensors come and
    go in blocks of that size, so memory freed by loading, by sharding (each rank's whole copy
    of the value net) and by each step stays resident. Measured, 2 SmolLM2 FSDP ranks: rank 0
    held 3.8 GB at the end of step 3 without it, 2.0 GB with it after setup and every step
    (1 process: 3.7 vs 3.0). Called after setup and after every step."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class TrainingRss:
    """The largest resident set seen while training, loading excluded: a daemon thread samples
    /proc/self/statm every 20 ms (Linux; None elsewhere). The process's own peak (ru_maxrss)
    includes loading the base, where every mode peaks alike, so it hides what gradient
    checkpointing or FSDP's sharding save during the steps."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None
        try:
            self._page = os.sysconf("SC_PAGE_SIZE")
            self._sample()
        except (OSError, ValueError, AttributeError):
            return
        self._thread = threading.Thread(target=self._watch, name="ivl-rss", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with open("/proc/self/statm") as f:
            self.peak = max(self.peak, int(f.read().split()[1]) * self._page)

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def mb(self) -> float | None:
        return round(self.peak / 2**20, 1) if self._thread is not None else None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto = cuda when available; under a launcher, each process its own GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch sees no CUDA device")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


# ---------------------------------------------------------------------------------------
# batches


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device),
            "attention_mask": attention_mask.to(device)}


def shard(examples: list[Example], d: distributed.Dist) -> list[Example]:
    """This rank's part of a global micro-batch: examples rank, rank + N, ..."""
    return examples[d.rank::d.world]


def token_counts(examples: list[Example], norm_positions: str) -> tuple[int, int]:
    """(response tokens scored, positions the norm penalty covers) of a micro-batch, as
    fused_loss counts them: the global denominators every rank divides its sums by."""
    n_response = sum(sum(1 for label in e.labels[1:] if label != IGNORE) for e in examples)
    n_norm = n_response if norm_positions == "response" else sum(len(e.input_ids) for e in examples)
    return n_response, n_norm


def micro_batch(examples: list[Example], index: int, batch_size: int, seed: int) -> list[Example]:
    """The index-th micro-batch of an endless sequence of seeded epochs (so resuming at a
    step replays exactly the batches an uninterrupted run would have seen)."""
    per_epoch = max(1, math.ceil(len(examples) / batch_size))
    epoch, offset = divmod(index, per_epoch)
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    picked = order[offset * batch_size:(offset + 1) * batch_size]
    return [examples[i] for i in picked]


# ---------------------------------------------------------------------------------------
# forward


def last_hidden(causal_lm: nn.Module, batch: dict) -> torch.Tensor:
    """(B, T, H) final hidden states (after the final norm), no logits."""
    out = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          use_cache=False)
    return out.last_hidden_state


def logits_head(causal_lm: nn.Module):
    """hidden -> logits exactly as the model's forward computes them (incl. soft-capping)."""
    head = causal_lm.get_output_embeddings()
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda h: torch.tanh(head(h) / cap) * cap


@dataclass
class Setup:
    cfg: TrainConfig
    base: BaseGGUF
    base_model: nn.Module | None      # None in full fine-tuning (the model *is* the base)
    model: nn.Module                  # what is trained: the value net, or the base itself
    init: str
    train_examples: list[Example]
    eval_examples: list[Example]
    dropped: int
    device: torch.device
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    history: list = field(default_factory=list)
    dist: distributed.Dist = field(default_factory=distributed.Dist)
    rss: TrainingRss | None = None     # while run() trains
    wrapped: nn.Module | None = None  # the objective under DistributedDataParallel or FSDP
    sharded: bool = False             # FSDP: every rank takes part in forward and saving
    bf16: bool = False                # autocast the value net's forward to bfloat16


class _Objective(nn.Module):
    """objective() as a module holding the trained network, so DDP or FSDP wraps the whole
    forward, the loss head included (the frozen base stays outside: neither broadcasts,
    syncs nor shards it)."""

    def __init__(self, s: Setup):
        super().__init__()
        self.model = s.model
        self._setup = [s]             # a list: not registered as a submodule

    def forward(self, batch: dict, denominators: tuple[int, int] | None):
        return objective(self._setup[0], batch, denominators)


def compute_loss(s: Setup, batch: dict, denominators: tuple[int, int] | None = None) -> LossParts:
    """The loss of a micro-batch; under DDP (when training) through the wrapped objective,
    whose backward averages the gradients over the processes; under FSDP always through it
    (it gathers the sharded weights)."""
    if s.wrapped is not None and (torch.is_grad_enabled() or s.sharded):
        return s.wrapped(batch, denominators)
    return objective(s, batch, denominators)


def objective(s: Setup, batch: dict, denominators: tuple[int, int] | None = None) -> LossParts:
    if s.bf16:
        with torch.autocast(s.device.type, dtype=torch.bfloat16):
            return _objective(s, batch, denominators)
    return _objective(s, batch, denominators)


def _objective(s: Setup, batch: dict, denominators) -> LossParts:
    mask = batch["attention_mask"].bool()                        # (B, T)
    targets = next_token_targets(batch["labels"])                # (B, T)
    norm_mask = norm_mask_of(batch["attention_mask"], targets, s.cfg.norm_positions)
    value_hidden = last_hidden(s.model, batch)[mask]             # (N, Hv) real positions
    if s.base_model is None:
        return fused_loss(value_hidden, None, targets[mask], norm_mask[mask] * 0,
                          logits_head(s.model), None, norm_weight=0.0, denominators=denominators)
    with torch.no_grad():
        base_hidden = last_hidden(s.base_model, batch)[mask]     # (N, Hb), frozen
    return fused_loss(value_hidden, base_hidden, targets[mask], norm_mask[mask],
                      logits_head(s.model), logits_head(s.base_model), s.cfg.norm_weight,
                      denominators=denominators)


@torch.no_grad()
def evaluate(s: Setup) -> dict:
    if not s.eval_examples:
        return {}
    s.model.eval()
    ce_sum = norm_sum = 0.0
    n_resp = n_correct = batches = 0
    for start in range(0, len(s.eval_examples), s.cfg.batch_size):
        batch = collate(s.eval_examples[start:start + s.cfg.batch_size], s.base.eos_id, s.device)
        parts = compute_loss(s, batch)
        ce_sum += parts.ce * parts.n_response
        norm_sum += parts.norm
        n_resp += parts.n_response
        n_correct += parts.n_correct
        batches += 1
    s.model.train()
    ce = ce_sum / max(n_resp, 1)
    return {"eval_ce": ce, "eval_norm": norm_sum / batches,
            "eval_loss": ce + s.cfg.norm_weight * norm_sum / batches * (s.base_model is not None),
            "eval_token_acc": n_correct / max(n_resp, 1), "eval_tokens": n_resp}


# ---------------------------------------------------------------------------------------
# setup


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-D), as the HF Trainer the official code uses.
    seen, decay, no_decay = set(), [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)


def _schedule(optimizer, total_steps: int, cfg: TrainConfig):
    warmup = max(1, round(cfg.warmup_ratio * total_steps)) if cfg.warmup_ratio > 0 else 0

    def factor(step: int) -> float:                   # step = optimizer steps done so far
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _unfreeze_for_finetune(model: nn.Module, train_layers: int) -> None:
    """Every weight trainable, or (train_layers > 0) only the last `train_layers` decoder
    layers and the final norm: embeddings, head and earlier layers stay frozen, so AdamW's
    state and the backward pass cover only those layers."""
    model.train()
    if not train_layers:
        for p in model.parameters():
            p.requires_grad_(True)
        return
    layers = model.model.layers
    if train_layers > len(layers):
        raise ConfigError(f"train_layers {train_layers}: the model has only {len(layers)} layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in (*layers[-train_layers:], model.model.norm):
        for p in module.parameters():
            p.requires_grad_(True)


def _checkpoint_activations(model: nn.Module) -> None:
    """transformers' own activation checkpointing of every decoder layer (non-reentrant, so
    it composes with DDP); the method's name changed in transformers 5."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def setup(cfg: TrainConfig, log=print, dist: distributed.Dist | None = None) -> Setup:
    dist = dist or distributed.Dist()
    if cfg.batch_size % dist.world:
        raise ConfigError(f"batch_size {cfg.batch_size} is the global micro-batch: it must be a "
                          f"multiple of the {dist.world} processes")
    if cfg.fsdp:
        distributed.require_group(dist)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device, dist.local_rank)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    base = BaseGGUF.open(cfg.base)
    examples, dropped = load_examples(cfg.data, base, cfg.max_len)
    train_examples, eval_examples = split_eval(examples, cfg.eval_fraction, cfg.seed)
    if cfg.check_tokenizer:
        from .tokcheck import compare_tokenizers
        report = compare_tokenizers(base)
        if report["mismatches"]:
            log(f"warning: the HF tokenizer differs from the GGUF one on {report['mismatches']}/"
                f"{report['samples']} sample texts (training uses the GGUF tokenizer)")
    base_model = freeze(load_causal_lm(base.path))
    if cfg.full_finetune:
        model, init = base_model, "full_finetune"
        _unfreeze_for_finetune(model, cfg.train_layers)
        if cfg.train_layers:
            init = f"partial_finetune:{cfg.train_layers}"
        base_model = None
    else:
        model, init = build_value_net(cfg, base, base_model)
        base_model.to(device=device, dtype=torch.bfloat16 if bf16 else None)   # frozen: bf16 halves it
    model.to(device)
    if cfg.grad_checkpointing:
        _checkpoint_activations(model)
    if cfg.resume:
        _check_resumable(cfg)
        ckpt.load_weights_into(model, cfg.out_dir)         # before DDP's broadcast / FSDP's sharding
    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_examples) / per_step))
    s = Setup(cfg, base, base_model, model, init, train_examples, eval_examples, dropped, device,
              total, None, None, dist=dist, bf16=bf16)
    if cfg.fsdp:
        s.wrapped, s.sharded = _Objective(s), True
        distributed.shard(s.wrapped, model.model.layers, dist, device)
    release_free_memory()                                  # the unsharded copy, loading's buffers
    s.optimizer = _optimizer(model, cfg)                   # after sharding: it holds the shards
    s.scheduler = _schedule(s.optimizer, total, cfg)
    if cfg.resume:
        _resume_state(s)
    if dist.active and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        s.wrapped = DDP(_Objective(s), device_ids=[device.index] if device.type == "cuda" else None,
                        broadcast_buffers=False)   # buffers are RoPE tables: equal, never synced
    return s


def _check_resumable(cfg: TrainConfig) -> None:
    saved = ckpt.load_meta(cfg.out_dir).get("train_config", {})
    now = cfg.to_json()
    defaults = TrainConfig(data=cfg.data, out_dir=cfg.out_dir).to_json()  # for settings added later
    changed = [k for k in now if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k, defaults[k]) != now[k]]
    if changed:
        raise ConfigError(f"cannot resume {cfg.out_dir}: settings differ from the saved run "
                          f"({', '.join(changed)})")


def _resume_state(s: Setup) -> None:
    state = ckpt.load_state(s.cfg.out_dir)
    distributed.load_optimizer_state(s.model, s.optimizer, state["optimizer"], s.sharded)
    s.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    s.step = state["step"]
    s.history = state.get("history", [])


# ---------------------------------------------------------------------------------------
# saving


def _meta(s: Setup, complete: bool, stats: dict) -> dict:
    return {
        "kind": "full_finetune" if s.cfg.full_finetune else "value",
        "complete": complete,
        "step": s.step,
        "total_steps": s.total_steps,
        "training_base": {"name": s.base.name, "file": str(s.base.path), "arch": s.base.arch,
                          "vocab_fingerprint": s.base.fingerprint, "vocab_size": s.base.vocab_size},
        "init": s.init,
        "recipe": {"connection": "residual", "norm_kind": "mean_abs",
                   "norm_weight": s.cfg.norm_weight, "norm_positions": s.cfg.norm_positions,
                   "learning_rate": s.cfg.learning_rate, "steps": s.step,
                   "data": data_digest(s.cfg.data),
                   "train_examples": len(s.train_examples), "eval_examples": len(s.eval_examples)},
        "train_config": s.cfg.to_json(),
        "stats": stats,
        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save(s: Setup, complete: bool, stats: dict) -> None:
    """Write the checkpoint (rank 0). Under FSDP every rank calls this: the weights and
    AdamW's state are gathered from every shard first."""
    if not (s.dist.main or s.sharded):
        return
    main = s.dist.main
    # Under FSDP rank 0 receives whole copies (fp32: 4 bytes per trained parameter for the
    # weights, 8 for AdamW's moments) on top of its shard. Spent gradients go first (the next
    # step zeroes them anyway), and the two copies are gathered one after the other, each
    # written and dropped before the next: 2 Qwen 0.5B FSDP ranks ran a 24 GB machine out of
    # memory holding both at once.
    s.optimizer.zero_grad(set_to_none=True)
    release_free_memory()
    weights = distributed.full_weights(s.model, s.sharded)
    if main:
        ckpt.save_model(s.cfg.out_dir, s.model, _meta(s, complete, stats), state=weights)
    del weights
    release_free_memory()
    optimizer = distributed.full_optimizer_state(s.model, s.optimizer, s.sharded)
    if main:
        ckpt.save_state(s.cfg.out_dir, {
            "step": s.step, "optimizer": optimizer,
            "scheduler": s.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "history": s.history,
        })
    del optimizer
    release_free_memory()


# ---------------------------------------------------------------------------------------
# loop


def run(s: Setup, progress: bool = True, log=print) -> Path:
    cfg, d = s.cfg, s.dist
    main = d.main                      # rank 0 alone logs, evaluates and writes the checkpoint
    collective = main or s.sharded     # FSDP: every rank takes part in evaluation and saving
    if main:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
    trainable = count_parameters(s.model, trainable_only=True)
    what = "fine-tuning" if cfg.full_finetune else "value net"
    mode = "FSDP" if s.sharded else "DDP"
    procs = f" x {d.world} processes ({mode}, global batch {cfg.batch_size})" if d.world > 1 or s.sharded else ""
    log(f"base {s.base.name} ({s.base.arch}, vocab {s.base.vocab_size}); {what} "
        f"{s.init}, {trainable / 1e6:.1f}M trainable params; {len(s.train_examples)} train / "
        f"{len(s.eval_examples)} eval examples ({s.dropped} dropped); {s.total_steps} steps on {s.device}{procs}")
    started = time.perf_counter()
    first_step, tokens = s.step, 0
    saved_step = s.step if cfg.resume else 0
    stats: dict = {}
    bar = _Bar(s.total_steps, s.step, enabled=progress and main)
    s.rss = TrainingRss()
    try:
        with bar:
            while s.step < s.total_steps:
                over_time = bool(cfg.max_seconds) and time.perf_counter() - started > cfg.max_seconds
                if distributed.any_rank(d, over_time):
                    log(f"stopping after {cfg.max_seconds:.0f} s (max_seconds) at step {s.step}")
                    break
                if cfg.pause_after and s.step >= cfg.pause_after:
                    log(f"pausing at step {s.step} (pause_after); continue with --resume")
                    break
                s.optimizer.zero_grad(set_to_none=True)
                ce = norm = 0.0
                for micro in range(cfg.grad_accum):
                    index = s.step * cfg.grad_accum + micro
                    parts, n_tokens = _micro_step(s, micro_batch(s.train_examples, index, cfg.batch_size, cfg.seed))
                    ce += parts.ce / cfg.grad_accum
                    norm += parts.norm / cfg.grad_accum
                    tokens += n_tokens
                if d.active:                    # each rank's ce/norm is its share of the global mean
                    ce, norm = distributed.sum_over_ranks(d, [ce, norm])
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip)
                lr = s.scheduler.get_last_lr()[0]
                s.optimizer.step()
                s.scheduler.step()
                s.step += 1
                release_free_memory()          # this step's activations and gradients
                record = {"step": s.step, "loss": ce + cfg.norm_weight * norm * (not cfg.full_finetune),
                          "ce": ce, "norm": norm, "lr": lr}
                if collective and ((cfg.eval_every and s.step % cfg.eval_every == 0) or s.step == s.total_steps):
                    record.update(evaluate(s))
                    if main and "eval_ce" in record:
                        bar.note(f"step {s.step}: eval ce {record['eval_ce']:.4f}, "
                                 f"token acc {record['eval_token_acc']:.3f}")
                s.history.append(record)
                if main:
                    ckpt.append_metrics(cfg.out_dir, record)
                bar.update(s.step, record["loss"])
                if cfg.save_every and s.step % cfg.save_every == 0 and s.step < s.total_steps:
                    save(s, complete=False, stats=_stats(s, started, first_step, tokens))
                    saved_step = s.step
    except KeyboardInterrupt:
        if s.sharded:
            # Gathering the shards needs every rank, and Ctrl-C stops each at another point.
            last = f"the last checkpoint (step {saved_step})" if saved_step else "no checkpoint (use --save-every)"
            raise TrainingInterrupted(f"training interrupted at step {s.step}/{s.total_steps}; under "
                                      f"--fsdp nothing is saved then: {last} is in {cfg.out_dir}") from None
        # Weights only change at optimizer steps, so they are those of step s.step.
        if main:
            save(s, complete=False, stats=_stats(s, started, first_step, tokens))
        raise TrainingInterrupted(f"training interrupted at step {s.step}/{s.total_steps}; "
                                  f"checkpoint saved in {cfg.out_dir} (continue with --resume)") from None
    finally:
        s.rss.close()
    stats = _stats(s, started, first_step, tokens)
    if collective and s.history and "eval_ce" not in s.history[-1]:
        s.history[-1].update(evaluate(s))
    stats["final"] = s.history[-1] if s.history else {}
    save(s, complete=s.step >= s.total_steps, stats=stats)
    log(f"done: {s.step} steps, {stats['steps_per_s']:.2f} steps/s, {stats['tokens_per_s']:.0f} "
        f"tokens/s, peak RSS {stats['peak_rss_mb']:.0f} MB; checkpoint {cfg.out_dir}")
    return cfg.out_dir


def _micro_step(s: Setup, examples: list[Example]) -> tuple[LossParts, int]:
    """Forward + backward of this rank's share of one global micro-batch; -> (its loss parts,
    the global micro-batch's tokens). Under DDP each rank divides by the global token counts
    and scales by the world size (DDP averages), so the gradient is the one-process one; a
    rank left without an example (a short last batch) runs one with weight 0, as every rank
    must take part in each backward."""
    d, accum = s.dist, s.cfg.grad_accum
    n_tokens = sum(len(e.input_ids) for e in examples)
    if not d.active:
        parts = compute_loss(s, collate(examples, s.base.eos_id, s.device))
        (parts.loss / accum).backward()
        return parts, n_tokens
    mine = shard(examples, d)
    weight = float(d.world) if mine else 0.0
    batch = collate(mine or examples[:1], s.base.eos_id, s.device)
    parts = compute_loss(s, batch, token_counts(examples, s.cfg.norm_positions))
    (parts.loss * (weight / accum)).backward()
    if not mine:
        parts = LossParts(parts.loss, 0.0, 0.0, 0, 0)
    return parts, n_tokens


def _stats(s: Setup, started: float, first_step: int, tokens: int) -> dict:
    elapsed = time.perf_counter() - started
    steps = s.step - first_step
    return {"train_seconds": round(elapsed, 2), "steps_this_run": steps,
            "steps_per_s": steps / elapsed if elapsed > 0 else 0.0,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "train_peak_rss_mb": s.rss.mb() if s.rss is not None else None, "device": str(s.device),
            "torch_threads": torch.get_num_threads()}


class _Bar:
    """Rich progress bar with the running loss and an ETA on a terminal; a line a minute
    (Heartbeat) on any other stderr."""

    def __init__(self, total: int, done: int, enabled: bool):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        tty = stderr_isatty()
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=self.console,
                                 disable=not (enabled and tty))
        self.task = self.progress.add_task("training", total=total, completed=done, loss="-")
        self.enabled = enabled
        # off a terminal (the eval harness's training job, nohup, CI) a line a minute instead
        self.beat = Heartbeat("training", total, done=done) if enabled and not tty else None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.beat is not None:
            self.beat.close()
        return self.progress.__exit__(*exc)

    def update(self, step: int, loss: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}")
        if self.beat is not None:
            self.beat.update(step, f"loss {loss:.4f}")

    def note(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text)
