"""csrc/cuda/xbar_kernel.cu run on the CPU (python_tests/cuda_emu/cuda_runtime.h stands in for the
CUDA runtime) against the reference: the CUDA kernel's logic is tested on machines without a GPU.
Needs a C++20 compiler (std::barrier); skipped without one."""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import torch

from xma2_ops.backends import dispatch, reference
from xma2_ops import quant
from xma2_ops.config import GemmParams
from xbar_cases import CONFIGS, make_codes, make_params, make_shape

ROOT = Path(__file__).resolve().parents[1]
EMU = Path(__file__).resolve().parent / "cuda_emu"
# `kernel<T><<<grid, block, 0, stream>>>(` -> `emu_launch(grid, block, kernel<T>, `
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<\w+>)?)<<<([^,]+), (dim3\([^)]*\)), 0, stream>>>\(")


class _Params(ctypes.Structure):
    """xma2::XbarParams (csrc/xbar_quant.h)."""
    _fields_ = [("M", ctypes.c_int64), ("K", ctypes.c_int64), ("N", ctypes.c_int64)] + [
        (f, ctypes.c_int) for f in ("rows", "cols", "x_bits", "x_pols", "dac_bits", "w_bits", "cell_bits",
                                    "adc_levels")] + [("adc_clip", ctypes.c_int64), ("periphery", ctypes.c_int)]


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> ctypes.CDLL:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    build = tmp_path_factory.mktemp("cuda_emu")
    source, n = _LAUNCH.subn(r"emu_launch(\2, \3, \1, ", (ROOT / "csrc/cuda/xbar_kernel.cu").read_text())
    assert n == 2, "expected the two kernel launches of xbar_kernel.cu"
    (build / "xbar_kernel_emu.cpp").write_text(source)
    lib = build / "libxbar_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wno-unknown-pragmas",
           f"-I{EMU}", f"-I{build}", f"-I{ROOT / 'csrc/cuda'}", str(EMU / "entry.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode and "barrier" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("the C++ compiler lacks C++20 <barrier>")
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(lib))


def _params(p: GemmParams, m: int, k: int, n: int) -> _Params:
    return _Params(m, k, n, p.rows, p.cols, p.x_bits, 2 if p.input_signed else 1, p.dac_bits, p.weight_bits - 1,
                   p.cell_bits, p.adc_levels, p.adc_clip, 0)  # the CUDA kernel computes periphery 0 only


def _ptr(t: Optional[torch.Tensor]) -> Optional[ctypes.c_void_p]:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


@pytest.mark.parametrize("case", range(len(CONFIGS)))
def test_emulated_cuda_kernel(emu, case):
    g = torch.Generator().manual_seed(1000 + case)
    cfg, p = make_params(CONFIGS[case])
    m, k, n = make_shape(case, g)
    m, n = m // 2 + 1, n // 2 + 17  # several blocks of 16 x 16, few threads to start
    x, wb = make_codes(cfg, p.input_signed, m, k, n, g)
    _, wt = make_codes(cfg, p.input_signed, 1, k, n, g)
    params = _params(p, m, k, n)

    out = torch.empty(-(-k // p.rows), m, n, dtype=torch.int64)
    assert emu.emu_tile_sums(_ptr(x), _ptr(wb), _ptr(out), ctypes.byref(params)) == 0
    assert torch.equal(out, reference.tile_sums(x, wb, p))

    tr, tc = cfg.tiles(k, n)
    mask = torch.randint(0, 3, (tr, tc), generator=g).double() / 2  # 0, 1/2, 1 per PE
    m_col = quant.column_tiles(mask, n, cfg.cols)
    coef_b = ((1 - m_col) * torch.rand(tr, n, generator=g, dtype=torch.float64)).contiguous()
    coef_t = (m_col * torch.rand(tr, n, generator=g, dtype=torch.float64)).contiguous()
    y = torch.empty(m, n, dtype=torch.float64)
    assert emu.emu_mvm_f64(_ptr(x), _ptr(wb), _ptr(wt), _ptr(coef_b), _ptr(coef_t), _ptr(y),
                           ctypes.byref(params)) == 0
    torch.testing.assert_close(y, reference.mvm(x, wb, wt, coef_b, coef_t, p), rtol=1e-12, atol=1e-9)

    coef_f = coef_b.float()
    y = torch.empty(m, n, dtype=torch.float32)
    assert emu.emu_mvm_f32(_ptr(x), _ptr(wb), None, _ptr(coef_f), None, _ptr(y), ctypes.byref(params)) == 0
    torch.testing.assert_close(y, reference.mvm(x, wb, None, coef_f, None, p), rtol=1e-6, atol=1e-3)


def test_emulated_cuda_kernel_levels_above_clip_is_not_lossless(emu):
    """adc_levels > adc_clip >= Pmax: the codes round(P n / clip) differ from P, so the kernel must take
    the ADC path (it took the lossless one when it tested levels >= clip).  The ops refuse such a
    config; the kernel's own predicate (adc_is_identity in csrc/xbar_quant.h) must still be right."""
    p = GemmParams(rows=8, cols=4, input_bits=3, input_signed=False, dac_bits=1, weight_bits=3, cell_bits=1,
                   adc_levels=13, adc_clip=9)
    assert p.pmax == 8 and not p.adc_identity
    g = torch.Generator().manual_seed(5)
    m, k, n = 7, 20, 18
    x = torch.randint(0, 8, (m, k), generator=g, dtype=torch.int32)
    w = torch.randint(-3, 4, (k, n), generator=g, dtype=torch.int32)
    out = torch.empty(-(-k // p.rows), m, n, dtype=torch.int64)
    assert emu.emu_tile_sums(_ptr(x), _ptr(w), _ptr(out), ctypes.byref(_params(p, m, k, n))) == 0
    want = reference.tile_sums(x, w, p)
    assert not torch.equal(want, torch.stack([x[:, r * 8:(r + 1) * 8].long() @ w[r * 8:(r + 1) * 8].long()
                                              for r in range(3)]))
    assert torch.equal(out, want)
