"""How many CPU threads a CPU run uses (README "CPU threads"; measured in benchmarks/cpu_threads.py).

torch's default is one thread per core. When other processes share the cores, every parallel region waits for its
slowest thread, which is often not scheduled: on a 2-core machine with other jobs running, the quickstart ran at
0.2 steps/s with 2 threads and 8 steps/s with 1. So a CPU run takes the cores that are free when it starts (the
cores it may use minus the load of the other processes: the 1-minute load average, rounded), divided among the
processes of the run, and leaves one core to the rest of the machine, so that a job starting later does not stall it;
at least 1. ``OMP_NUM_THREADS`` or ``POSTTRAIN_NUM_THREADS`` override the choice.
"""

from __future__ import annotations

import logging
import math
import os

logger = logging.getLogger("posttrain")


def pick_num_threads(cores: int, load: float, processes: int = 1) -> int:
    """Threads per process: ``(cores - load) / processes`` rounded, at most ``(cores - 1) // processes`` (one core
    left free), at least 1. ``load``: runnable threads of other processes (the load average as this run starts; its
    own imports add a little, hence rounding rather than flooring)."""
    processes = max(1, processes)
    free = max(0.0, cores - max(0.0, load))
    return max(1, min((cores - 1) // processes, math.floor(free / processes + 0.5)))


def configure_cpu_threads() -> int:
    """Set torch's intra-op threads for a CPU run and log the choice once; returns it."""
    import torch

    for var in ("POSTTRAIN_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                threads = int(value)
            except ValueError:
                from posttrain.errors import UserError

                raise UserError(f"{var}: expected a number of threads, got {value!r}") from None
            if threads < 1:
                from posttrain.errors import UserError

                raise UserError(f"{var}: expected a number of threads >= 1, got {threads}")
            torch.set_num_threads(threads)
            logger.info("CPU threads: %d (from %s)", threads, var)
            return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    threads = pick_num_threads(cores, load, processes)
    torch.set_num_threads(threads)
    logger.info("CPU threads: %d per process (%d cores, load %.1f from other processes, %d process%s; set "
                "OMP_NUM_THREADS to override)", threads, cores, load, processes, "" if processes == 1 else "es")
    return threads
