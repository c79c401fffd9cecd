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

    cxx = ["-O2", "-g0", "-std=c++17"]
    link = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is an OpenMP pragma in ATen's headers: without -fopenmp the kernels
        # compile to a serial loop (torch itself uses GNU OpenMP, which -fopenmp links).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = ["csrc/ops.cpp", "csrc/pymodule.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    forced = os.environ.get("XMA2_CUDA")
    with_cuda = forced == "1" or (forced != "0" and torch.version.cuda is not None
                                  and cpp_extension.CUDA_HOME is not None)
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        return cpp_extension.CUDAExtension(
            "xma2_ops._C", sources, py_limited_api=False,
            extra_compile_args={"cxx": cxx + ["-DXMA2_WITH_CUDA"], "nvcc": ["-O2", "-lineinfo", "-std=c++17"]},
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
