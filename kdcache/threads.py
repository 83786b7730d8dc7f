"""Thread counts of a process that runs torch next to other busy threads (the build's writer,
zarr's codec threads, DataLoader workers).

torch's default intra-op thread count is every core the machine has. A build also runs a
writer thread (validation, compression, disk writes) and zarr's codec threads, and a training
run with DataLoader workers runs those processes next to the model; torch's OpenMP threads meet
at a barrier after every parallel region, so a core taken by another thread (or another job on
a shared machine) stalls all of them. :func:`scoped_threads` sets the counts for one block and
restores them afterwards (tests and benchmarks run many builds in one process).

Measurements behind the ``auto`` rules: docs/performance/build.md, "Threads".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroup cpusets, Slurm)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def local_ranks() -> int:
    """Processes of this job sharing the machine (torchrun's LOCAL_WORLD_SIZE; 1 without it)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def parse_threads(value: int | str | None, option: str = "--threads") -> int | None:
    """``auto``/None -> None (the caller's rule decides); an integer >= 1 -> itself; anything
    else -> ValueError naming ``option``."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{option} {value!r}: expected a number of threads >= 1, or auto"
        ) from None
    if n < 1:
        raise ValueError(f"{option} {n}: must be >= 1 (or auto)")
    return n


def auto_build_threads(device: str) -> int:
    """The build's torch intra-op threads when ``--threads auto``.

    An explicit ``OMP_NUM_THREADS`` (the user's, or torchrun's 1 per process) is kept. Otherwise
    CPU builds get the CPUs this process may use, shared among torchrun's local ranks, minus one
    for the writer thread (at least 1); on 2 cores that is 1 thread, which was many times
    faster than torch's default of 2 on a loaded machine (docs/performance/build.md,
    "Threads"). CUDA builds run the model on the GPU; their torch CPU threads only do host-side
    glue, so they get at most 2 (not measured on a GPU here).
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    per_rank = max(1, usable_cpus() // local_ranks())
    if str(device).startswith("cuda"):
        return min(2, per_rank)
    return max(1, per_rank - 1)


def auto_encode_threads() -> int:
    """Chunks a CacheWriter encodes and writes at once when ``encode_threads`` is not given.

    ``KDCACHE_ENCODE_THREADS`` (an integer >= 1) wins. Otherwise the CPUs this process may use,
    shared among torchrun's local ranks, capped at 4, at least 2: one chunk compresses while the
    next is validated even on one core (compression releases the GIL, and a chunk write also
    waits on the disk), and a second chunk in flight lets two cores compress at once. Measured
    in docs/performance/cache_io.md ("2026-12-05"): 2 and 4 within noise of each other on
    2 loaded cores, both ahead of 1.
    """
    env = os.environ.get("KDCACHE_ENCODE_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return min(4, max(2, usable_cpus() // local_ranks()))


@contextmanager
def scoped_threads(torch_threads: int, blosc_threads: int = 1) -> Iterator[None]:
    """Run a block with ``torch_threads`` intra-op threads (torch.set_num_threads: OpenMP and
    MKL) and Blosc at ``blosc_threads`` threads, restoring the previous values afterwards.

    Blosc: with 1 thread each compression runs on the calling thread (numcodecs'
    ``use_threads = False``: its context API, no global lock); more turns on Blosc's own pool
    (``use_threads = True``, ``set_nthreads``), whose calls numcodecs serialises with one lock.
    torch's inter-op pool is left alone: the build and the training loop start no inter-op work
    (no ``torch.jit.fork``), so its threads are never created, and its size can be set only once
    per process.
    """
    import torch
    from numcodecs import blosc

    old_torch = torch.get_num_threads()
    old_use, old_blosc = blosc.use_threads, blosc.get_nthreads()
    try:
        if torch_threads != old_torch:
            torch.set_num_threads(torch_threads)
        blosc.set_nthreads(max(1, blosc_threads))
        blosc.use_threads = blosc_threads > 1
        yield
    finally:
        if torch.get_num_threads() != old_torch:
            torch.set_num_threads(old_torch)
        blosc.set_nthreads(old_blosc)
        blosc.use_threads = old_use
