"""Builds xma2_ops._C: the op schemas, the C++ CPU kernels and (when torch has CUDA and nvcc
is found, or XMA2_CUDA=1) the CUDA kernels.  Install with `pip install --no-build-isolation .`
after torch is installed."""
import glob
import os
import sys

from setuptools import setup, find_packages


def _extension():
    import torch
    from torch.utils import cpp_extension

    # No -std flag: torch's build adds the standard its headers need (C++20 from torch 2.14 on).
    cxx = ["-O2", "-g0"]
    link = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is an OpenMP pragma in ATen's headers: without -fopenmp the kernels
        # compile to a serial loop (torch itself uses GNU OpenMP, which -fopenmp links).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = ["csrc/ops.cpp", "csrc/pymodule.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # CUDA kernels need a CUDA build of torch and nvcc, not a visible GPU (build machines often have none).
    forced = os.environ.get("XMA2_CUDA")
    if forced not in (None, "", "0", "1"):
        raise RuntimeError(f"XMA2_CUDA: expected 0 or 1, got {forced!r}")
    if forced == "1" and (torch.version.cuda is None or cpp_extension.CUDA_HOME is None):
        raise RuntimeError(f"XMA2_CUDA=1 needs a CUDA build of torch (torch.version.cuda={torch.version.cuda}) "
                           f"and the CUDA toolkit (CUDA_HOME={cpp_extension.CUDA_HOME}; set CUDA_HOME)")
    with_cuda = forced == "1" or (forced != "0" and torch.version.cuda is not None
                                  and cpp_extension.CUDA_HOME is not None)
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        return cpp_extension.CUDAExtension(
            "xma2_ops._C", sources, py_limited_api=False,
            extra_compile_args={"cxx": cxx + ["-DXMA2_WITH_CUDA"], "nvcc": ["-O2", "-lineinfo"]},
            extra_link_args=link)
    return cpp_extension.CppExtension("xma2_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(  # metadata lives in pyproject.toml
    packages=find_packages(include=["xma2_ops", "xma2_ops.*"]),
    ext_modules=[_extension()],
    cmdclass=_cmdclass(),
)
