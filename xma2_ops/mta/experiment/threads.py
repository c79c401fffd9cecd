"""A passive OpenMP wait policy for the experiment's command line on a shared machine.

libgomp (PyTorch's OpenMP runtime on Linux) lets an idle worker thread spin for a while after every
parallel region before it sleeps.  On a machine whose cores other processes keep busy, those spins
steal the time the other threads of the same region need: the experiment's many small ops lose far
more than the cores they lost (measurements in BENCHMARKS.md).  With
``OMP_WAIT_POLICY=PASSIVE`` idle threads sleep at once.

libgomp reads the variable once, when it is loaded (with torch), so it must be in the environment
before ``import torch``.  The library (``import xma2_ops``) cannot and must not set it: by the time
it runs torch is loaded, and an import must not change the threading of the user's whole process.
The command line can: ``examples/*.py`` set ``os.environ`` before they import torch;
``python -m xma2_ops.mta`` and the ``xma2-mta`` script start after ``xma2_ops/__init__`` has
imported torch, so they re-execute the interpreter once with the variable set
(``reexec_with_passive_wait_policy``).  A policy the user chose (OMP_WAIT_POLICY or
GOMP_SPINCOUNT in the environment) is always kept.
"""
from __future__ import annotations

import os
import sys
from typing import List, Mapping, Optional

USER_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def user_set_policy(environ: Mapping[str, str] = os.environ) -> bool:
    return any(v in environ for v in USER_VARIABLES)


def set_passive_wait_policy(environ=os.environ) -> bool:
    """Before torch is imported: OMP_WAIT_POLICY=PASSIVE unless the user set a policy; True if set."""
    if user_set_policy(environ):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def reexec_command(args: List[str]) -> List[str]:
    return [sys.executable, "-m", "xma2_ops.mta", *args]


def reexec_with_passive_wait_policy(args: List[str], environ=os.environ, execv=os.execv) -> Optional[List[str]]:
    """If torch is loaded and no policy is set: set OMP_WAIT_POLICY=PASSIVE and replace this process
    by ``python -m xma2_ops.mta ARGS`` (does not return).  The variable itself guards against a
    loop: the new process finds it set.  Returns None when nothing had to be done."""
    if user_set_policy(environ):
        return None
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" not in sys.modules:  # (not the case under ``python -m``: xma2_ops imports torch)
        return None
    cmd = reexec_command(args)
    sys.stdout.flush()
    sys.stderr.flush()
    execv(sys.executable, cmd)
    return cmd  # (only reached with a test's execv)


def spinning_hint(log, environ: Mapping[str, str] = os.environ) -> None:
    """The user chose a spinning policy (OMP_WAIT_POLICY=ACTIVE, or a large GOMP_SPINCOUNT) on a loaded
    machine: say what it costs."""
    policy = environ.get("OMP_WAIT_POLICY", "").upper()
    spin = environ.get("GOMP_SPINCOUNT", "")
    spinning = policy == "ACTIVE" or (spin.isdigit() and int(spin) > 100_000) or spin.upper() == "INFINITE"
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if spinning and load > 0.5 * cores:
        log(f"note: load average {load:.1f} on {cores} cores with a spinning OpenMP wait policy "
            f"(OMP_WAIT_POLICY={policy or '-'}, GOMP_SPINCOUNT={spin or '-'}): OMP_WAIT_POLICY=PASSIVE or "
            f"--threads 1 is usually faster on a shared machine (docs/MTA.md)")
