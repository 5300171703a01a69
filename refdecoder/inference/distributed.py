"""Several processes over one dataset: rank and world size, process group, device per rank, shares of the inputs.

Launched by ``torchrun --nproc-per-node N [--nnodes M ...] -m refdecoder <command>`` or ``accelerate launch``,
every process reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from its environment (or takes them as arguments
in Python). A process group is created only when ``WORLD_SIZE > 1``: gloo on CPU, nccl on CUDA, each rank on
``cuda:LOCAL_RANK``. Without a launcher everything here is a no-op and a command runs as one process.

The work is cut once, deterministically, from what every rank can compute alone: :func:`share` gives each rank
a set of inputs balanced by a weight (frame count), greedy longest-first, so the same inputs and world size give
the same shares on every machine and every rerun.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from refdecoder.errors import ConfigError

__all__ = [
    "RankContext",
    "rank_context",
    "init_distributed",
    "close_distributed",
    "barrier",
    "gather_objects",
    "share",
    "map_shared",
    "exit_if_told",
]

T = TypeVar("T")
R = TypeVar("R")

# A test hook: ``REFDECODER_TEST_EXIT_AFTER=RANK:N`` makes that rank exit with status 17 after its N-th finished
# item, so the tests can kill one rank in the middle of a run without relying on timing.
_EXIT_AFTER = "REFDECODER_TEST_EXIT_AFTER"
_TIMEOUT = timedelta(minutes=60)  # a barrier may wait for the slowest rank's whole share
_OWNED = {"group": False}  # whether init_distributed created the process group (then close_distributed ends it)


@dataclass(frozen=True)
class RankContext:
    """Where this process stands in a run.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of processes in the run (all nodes).
        local_rank: rank on this machine; picks the GPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True when several processes share the run."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, which writes the run's merged outputs and prints by default."""
        return self.rank == 0

    @property
    def label(self) -> str:
        """``"rank 1/4"``, or ``""`` for a single process."""
        return f"rank {self.rank}/{self.world_size}" if self.distributed else ""


def rank_context(rank: int | None = None, world_size: int | None = None, local_rank: int | None = None) -> RankContext:
    """The run's rank, world size and local rank: the arguments, else ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``
    from the environment (set by torchrun, accelerate and SLURM-aware launchers), else a single process.

    Raises:
        ConfigError: values that are not integers or a rank outside ``[0, world_size)``.
    """
    world = _int(world_size, "WORLD_SIZE", 1)
    rank = _int(rank, "RANK", 0)
    local = _int(local_rank, "LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"rank {rank}, local rank {local} and world size {world} do not fit 0 <= rank < world_size")
    return RankContext(rank, world, local)


def _int(value: int | None, variable: str, default: int) -> int:
    if value is not None:
        return int(value)
    text = os.environ.get(variable, "")
    try:
        return int(text) if text.strip() else default
    except ValueError:
        raise ConfigError(f"{variable}={text!r} in the environment is not an integer (set by the launcher)") from None


def init_distributed(ctx: RankContext, device: str | torch.device | None = None) -> torch.device:
    """This rank's device, and the process group when the run has several processes.

    ``device`` None picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ``"cuda"`` without an index
    becomes ``cuda:LOCAL_RANK`` as well, so every rank of a node gets its own GPU. The group uses nccl for CUDA and
    gloo for the CPU, with the launcher's ``MASTER_ADDR`` / ``MASTER_PORT`` rendezvous.

    Raises:
        ConfigError: several processes but no rendezvous address in the environment.
        InputError: a device name torch does not know or this machine does not have.
    """
    from refdecoder.inference.loading import resolve_device

    chosen = resolve_device(None if device is None else str(device))
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", ctx.local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if not ctx.distributed or torch.distributed.is_initialized():
        return chosen
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={ctx.world_size} but {' and '.join(missing)} are not set; launch with torchrun or "
            "accelerate launch, or set them to rank 0's address and a free port"
        )
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": chosen} if backend == "nccl" else {}
    torch.distributed.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size, timeout=_TIMEOUT, **kwargs)
    _OWNED["group"] = True
    return chosen


def close_distributed() -> None:
    """Tear down the process group :func:`init_distributed` created (idempotent); a group the caller made
    itself (e.g. a script running several commands in one launch) is left to the caller."""
    if _OWNED["group"] and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OWNED["group"] = False


def barrier(ctx: RankContext) -> None:
    """Wait for every rank (a no-op for a single process)."""
    if ctx.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()


def gather_objects(ctx: RankContext, value: T) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order, on every rank; ``[value]`` for a single process."""
    if not (ctx.distributed and torch.distributed.is_initialized()):
        return [value]
    out: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, value)
    return out


def share(weights: Sequence[float], world_size: int, rank: int) -> list[int]:
    """Indices of the items ``rank`` processes: greedy longest-first over ``weights`` (e.g. frame counts).

    Items are taken heaviest first (ties: lower index first) and each goes to the rank with the least weight so
    far (ties: lower rank). The result depends only on the weights and the world size, so every rank computes
    the same split on its own; it is at most one item's weight from the best balance. The indices come back in
    increasing order, so a rank walks its share in the inputs' order.
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside a world of {world_size}")
    loads = [(0.0, r) for r in range(world_size)]  # a heap of (weight so far, rank)
    mine = []
    for index in sorted(range(len(weights)), key=lambda i: (-float(weights[i]), i)):
        load, owner = heapq.heappop(loads)
        heapq.heappush(loads, (load + float(weights[index]), owner))
        if owner == rank:
            mine.append(index)
    return sorted(mine)


def map_shared(ctx: RankContext, items: Sequence[T], fn: Callable[[T], R]) -> list[R]:
    """``[fn(item) for item in items]`` with the calls spread over the ranks (round robin) and the results
    gathered on every rank; for cheap per-item work every rank needs, such as probing frame counts."""
    mine = [fn(item) for item in items[ctx.rank :: ctx.world_size]]
    parts = gather_objects(ctx, mine)
    out: list[Any] = [None] * len(items)
    for rank, results in enumerate(parts):
        out[rank :: ctx.world_size] = results
    return out


def exit_if_told(ctx: RankContext, finished: int) -> None:
    """Exit (status 17, as a crash would) when ``REFDECODER_TEST_EXIT_AFTER=RANK:N`` names this rank and
    ``finished`` reached N. For the tests of killed ranks; does nothing otherwise."""
    spec = os.environ.get(_EXIT_AFTER, "")
    if not spec:
        return
    rank, _, count = spec.partition(":")
    if int(rank) == ctx.rank and finished >= int(count):
        os._exit(17)  # no clean-up, no flush: what a killed process leaves behind
