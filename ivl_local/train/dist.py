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
                local_rank=int(os.environ.get("LOCAL_RANK", "0")), started_here=started)


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
