"""xma2_ops: bit-exact ReRAM crossbar simulation for multi-task adaption (XMA2).

See README.md for the API and docs/SPEC.md for the exact semantics.
"""
from .config import XbarConfig
from ._ops import available_backends
from .functional import xbar_conv2d, xbar_linear
from .modules import XbarConv2d, XbarLinear, convert

__all__ = ["XbarConfig", "available_backends", "xbar_conv2d", "xbar_linear", "XbarConv2d", "XbarLinear", "convert"]
