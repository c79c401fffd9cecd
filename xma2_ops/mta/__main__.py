"""``python -m xma2_ops.mta [device-sweep | chip-table] ...``: the multi-task experiment (experiment/cli.py).

Re-executes itself once with OMP_WAIT_POLICY=PASSIVE unless a policy is set (experiment/threads.py)."""
import sys

from .experiment.threads import reexec_with_passive_wait_policy

if __name__ == "__main__":
    reexec_with_passive_wait_policy(sys.argv[1:])
    from .experiment.cli import main
    main(sys.argv[1:])
