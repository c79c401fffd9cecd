"""What the benchmark scripts share: the timing loop (calls taken in turns), the table row formatter,
the machine line (CPU name, load average) and the busy competitor processes of ``--busy``.

The scripts import it as ``timing`` (their own folder is on ``sys.path`` when run as scripts)."""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional


def time_in_turns(fns: Dict[str, Callable[[], object]], repeats: int,
                  sync: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Median seconds per call of each function; one warm-up call each (caches, weight packing), then
    the calls in turns (one of each per round) so that a change of machine load hits all of them
    alike.  ``sync`` (e.g. ``torch.cuda.synchronize``) runs after the warm-up and after every call."""
    def wait() -> None:
        if sync is not None:
            sync()

    for fn in fns.values():
        fn()
    wait()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            wait()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def row(cells: List[str], widths: List[int]) -> str:
    """One table row: the first cell left-aligned, the others right-aligned, to the given widths."""
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "?"


def load() -> str:
    return "load average " + " / ".join(f"{v:.2f}" for v in os.getloadavg())


def start_busy(n: int) -> List[subprocess.Popen]:
    """n busy-looping processes (``while True: pass``, the caller's nice level: an equal competitor)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_busy(procs: List[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


@contextlib.contextmanager
def busy(n: int) -> Iterator[None]:
    """n busy processes (start_busy) while the block runs."""
    procs = start_busy(n)
    try:
        yield
    finally:
        stop_busy(procs)
