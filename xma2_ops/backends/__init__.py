"""The backends: one module per backend (reference, cpp, triton/, periphery), their common
contract (base.py) and the dispatch (dispatch.py: ``Backend``, ``available_backends``,
``get_backend``, ``backend_for``)."""
from .base import BackendBase
from .dispatch import Backend, available_backends, backend_for, check_backend_name, get_backend

__all__ = ["Backend", "BackendBase", "available_backends", "backend_for", "check_backend_name", "get_backend"]
