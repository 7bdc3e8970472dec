"""Which prompts this process scores: contiguous shards, SLURM-array shards and torch.distributed ranks.

A data-parallel scoring run splits the prompts ``0..n-1`` into **contiguous** parts, one per
process, with no padding rows and no duplicates (unlike ``DistributedSampler``, which repeats
indices to make the parts equal). Parts differ in size by at most one prompt.

Two levels of splitting compose:

* ``--shard i/N`` (:func:`parse_shard`): job ``i`` of ``N`` independent jobs, e.g. a SLURM
  array (``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``);
* the processes of one ``torchrun`` / ``accelerate launch`` job (:func:`current_process`, read
  through ``accelerate.PartialState``): rank ``r`` of ``W`` takes part ``r`` of its job's shard.

:func:`layout` gives every part of the whole run, so any process can tell which parts exist and
whether they tile the prompts exactly.

Example:
    >>> split_range(range(10), 3)
    [range(0, 4), range(4, 7), range(7, 10)]
    >>> layout(10, Shard(1, 2), world_size=2)
    [range(0, 3), range(3, 5), range(5, 8), range(8, 10)]
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import cast

from tuco_lens.errors import InputError

__all__ = ["Shard", "ProcessInfo", "parse_shard", "split_range", "layout", "part_of", "current_process", "split_threads"]


@dataclass(frozen=True)
class Shard:
    """Job ``index`` of ``count`` independent jobs (``--shard index/count``, 0-based).

    Attributes:
        index: This job, ``0 <= index < count``.
        count: Number of jobs.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise InputError(f"a shard count must be a positive integer, got {self.count!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise InputError(
                f"shard index {self.index!r} is outside 0..{self.count - 1} (shards are 0-based: "
                f"--shard 0/{self.count} ... --shard {self.count - 1}/{self.count})"
            )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | Shard | tuple[int, int] | None) -> Shard:
    """``"i/N"`` (or ``(i, N)``, or a :class:`Shard`) as a :class:`Shard`; ``None`` is the whole run.

    Raises:
        InputError: not of the form ``i/N`` with ``0 <= i < N``.

    Example:
        >>> parse_shard("3/8")
        Shard(index=3, count=8)
    """
    if text is None:
        return Shard()
    if isinstance(text, Shard):
        return text
    if isinstance(text, tuple) and len(text) == 2:
        return Shard(*text)
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None:
        raise InputError(
            f"--shard must be INDEX/COUNT with a 0-based INDEX, e.g. --shard 0/4, got {text!r} "
            "(in a SLURM array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-3)"
        )
    return Shard(int(match.group(1)), int(match.group(2)))


def split_range(rows: range, parts: int) -> list[range]:
    """``rows`` cut into ``parts`` contiguous ranges whose sizes differ by at most one (larger first).

    Every element of ``rows`` is in exactly one range; ranges may be empty when ``parts`` exceeds
    ``len(rows)``. Nothing is padded or repeated.

    Example:
        >>> split_range(range(5), 2)
        [range(0, 3), range(3, 5)]
    """
    if parts < 1:
        raise InputError(f"cannot split into {parts} parts")
    size, extra = divmod(len(rows), parts)
    out, start = [], rows.start
    for k in range(parts):
        stop = start + size + (1 if k < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def layout(n_prompts: int, shard: Shard = Shard(), world_size: int = 1) -> list[range]:
    """Every part of a run over ``n_prompts`` prompts: ``shard.count`` jobs × ``world_size`` processes.

    Part ``shard_index * world_size + rank`` is the ``rank``-th contiguous piece of the
    ``shard_index``-th contiguous shard. The parts tile ``range(n_prompts)`` in order.

    Example:
        >>> layout(5, Shard(0, 1), world_size=2)
        [range(0, 3), range(3, 5)]
    """
    return [piece for job in split_range(range(n_prompts), shard.count) for piece in split_range(job, world_size)]


def part_of(n_prompts: int, shard: Shard, rank: int, world_size: int) -> range:
    """The prompts rank ``rank`` of ``world_size`` scores in job ``shard``.

    Example:
        >>> part_of(10, Shard(1, 2), rank=0, world_size=2)
        range(5, 8)
    """
    return layout(n_prompts, shard, world_size)[shard.index * world_size + rank]


@dataclass(frozen=True)
class ProcessInfo:
    """This process in its ``torchrun`` / ``accelerate launch`` job (rank 0 of 1 when run alone).

    Attributes:
        rank: Global rank (``RANK``).
        world_size: Number of processes (``WORLD_SIZE``).
        local_rank: Rank on this machine (``LOCAL_RANK``).
        local_world_size: Processes on this machine (``LOCAL_WORLD_SIZE``).
        device: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu`` (``PartialState().device``);
            ``None`` when run alone (the loaders' own default).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: str | None = None

    @property
    def distributed(self) -> bool:
        """Whether this process is one of several launched together."""
        return self.world_size > 1


def _launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def current_process() -> ProcessInfo:
    """Rank, world size and device of this process, through ``accelerate.PartialState``.

    Under ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1) this initialises
    torch.distributed (NCCL on GPUs, gloo on CPU) once; run alone it touches nothing and returns
    rank 0 of 1.

    Example:
        >>> current_process()
        ProcessInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=None)
    """
    if _launched_world_size() <= 1:
        return ProcessInfo()
    import torch
    from accelerate import PartialState

    # accelerate takes the CPU route (gloo) only when asked to: with cpu=True
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=cpu)
    device = cast(torch.device, state.device)  # set by PartialState(); accelerate infers it as optional
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    return ProcessInfo(
        rank=state.process_index,
        world_size=state.num_processes,
        local_rank=state.local_process_index,
        local_world_size=local_world,
        device="cpu" if device.type == "cpu" else str(device),
    )


def split_threads(process: ProcessInfo, threads: int | None = None) -> int | None:
    """Set torch's CPU threads for this process; returns the number set (``None``: untouched).

    ``threads`` wins when given. Otherwise, for several processes on a CPU machine, the cores
    are split evenly (``cores // local_world_size``, at least 1): ``torchrun`` itself sets
    ``OMP_NUM_THREADS=1``, which would leave most cores idle. A process run alone is untouched.

    Example:
        >>> split_threads(ProcessInfo(), threads=1)
        1
    """
    import torch

    if threads is None:
        if not process.distributed or (process.device or "cpu").startswith("cuda"):
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // process.local_world_size)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)
    return threads
