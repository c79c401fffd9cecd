"""xma2_ops: bit-exact ReRAM crossbar simulation for multi-task adaption (XMA2).

See README.md for the API and docs/SPEC.md for the exact semantics.
"""
from importlib import metadata as _metadata

from .config import XbarConfig
from .device import DeviceModel
from .backends import available_backends
from .functional import xbar_conv2d, xbar_linear
from .modules import XbarConv2d, XbarLinear, convert, program
from .calibration import calibrate_adc
from .programmed import ProgrammedWeight

try:
    __version__ = _metadata.version("xma2_ops")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["XbarConfig", "DeviceModel", "available_backends", "xbar_conv2d", "xbar_linear", "XbarConv2d", "XbarLinear", "convert",
           "program", "calibrate_adc", "ProgrammedWeight", "__version__"]
