"""Backend "triton": kernels.py (the @triton.jit device code), launch.py (grid and arguments of a
launch), ops.py (the ``torch.library.triton_op`` registrations and the backend's entry points).

Importing this package does not import Triton; dispatch.py imports ``ops`` and, when Triton is
missing or fails to load, reports the backend as missing with the reason.
"""
