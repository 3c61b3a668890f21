"""Training on several processes: PyTorch distributed, as `torchrun` (or `accelerate launch`)
starts it. Nothing here is home-made: the process group comes from the launcher's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), gradients are averaged by
DistributedDataParallel.

    ivl train ...                                      # one process: nothing changes
    torchrun --nproc_per_node 2 -m ivl_local.cli.main train ...   # DDP over 2 processes

Contract (ivl_local.train.trainer keeps it):
  * `batch_size` is the *global* micro-batch: the same examples in the same order whatever the
    world size; rank r takes examples r, r + N, ... of it. Each rank's loss is its share of
    the global mean (divided by the global token counts), so 1 and N processes compute the same
    loss and, after DDP's average (times N), the same gradient.
  * rank 0 alone logs, draws progress, evaluates and writes checkpoints; a checkpoint is the
    same whatever the world size, so --resume works on another one.
  * --fsdp (FSDP2, `torch.distributed.fsdp.fully_shard`): each decoder layer of the trained
    network, and the rest of it (embeddings, final norm, head) with the loss around it, is
    sharded over the processes; AdamW's state lives with the shards. Every rank then takes
    part in what gathers parameters (evaluation, saving), and rank 0 alone writes. The frozen
    base stays replicated (inference only: no gradient or optimizer state to shard).

No torch import at module level: the CLI asks `launched_rank()` before torch is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched by one)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False          # this module made the process group (and ends it)
    group: bool = False                 # a process group exists (a launcher started us)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def start(use_cuda: bool) -> Dist:
    """The process group the launcher asked for (gloo on CPU, nccl on CUDA), or a one-process
    Dist when there is no launcher."""
    import torch.distributed as dist

    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if not launched and not dist.is_initialized():
        return Dist()
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run one process")
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        started = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")), started_here=started, group=True)


def stop(d: Dist) -> None:
    if d.started_here:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def any_rank(d: Dist, flag: bool) -> bool:
    """True on every rank when `flag` is True on one (so all stop at the same step)."""
    if not d.active:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_over_ranks(d: Dist, values: list[float]) -> list[float]:
    if not d.active:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def require_group(d: Dist) -> None:
    if not d.group:
        raise ConfigError("--fsdp shards the trained network over processes, and none was "
                          "launched: start ivl-train with torchrun (e.g. torchrun "
                          "--nproc_per_node 2 -m ivl_local.cli.main train ... --fsdp)")


def shard(objective, layers, d: Dist, device) -> None:
    """FSDP2 over every process: each decoder layer its own unit (gathered only while it
    runs), then `objective` (the module holding the trained network and the loss head) as
    the root unit holding what is left. Parameters become DTensors in place, so the
    optimizer must be built after this. (setup() calls require_group first, before loading.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (d.world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(objective, mesh=mesh)


def full_weights(model, sharded: bool) -> dict:
    """The trained network's whole state dict on the CPU (under FSDP every rank must call
    this: the shards are gathered; rank 0 receives them)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer, sharded: bool) -> dict:
    """AdamW's state keyed by parameter name, whole and on the CPU, the same with or
    without FSDP (so a checkpoint resumes in either mode and on any world size); under FSDP
    every rank must call this and rank 0 receives it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=sharded))


def load_optimizer_state(model, optimizer, state: dict, sharded: bool) -> None:
    """Inverse of full_optimizer_state (every rank reads the whole state and keeps its part).
    A state keyed by position (checkpoints written before names were used) loads directly,
    without FSDP."""
    groups = state.get("param_groups") or [{}]
    if any(isinstance(key, int) for key in state.get("state", {})) or any(
            isinstance(p, int) for p in groups[0].get("params", [])):
        if sharded:
            raise ConfigError("this checkpoint's optimizer state is from an older ivl-train: "
                              "resume it once without --fsdp, then with it")
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
