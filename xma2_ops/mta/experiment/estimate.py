"""What the full run will cost, printed by a --quick run before its runs."""
from __future__ import annotations


def print_full_run_estimate(model, tasks, args, full_args, log) -> None:
    pass
