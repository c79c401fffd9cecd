"""The "triton" backend's device model (docs/SPEC.md 7.2) against the reference, bit for bit, and the
Triton kernels as torch.library.triton_ops (opcheck, traces with the kernel visible).

Without a GPU the kernels run on CPU tensors in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1); with a GPU they run compiled on CUDA.  Shapes stay small: the interpreter is slow.
"""
from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import xma2_ops  # noqa: E402
from xma2_ops import DeviceModel, XbarConfig  # noqa: E402
from xma2_ops.backends import dispatch, reference as ref  # noqa: E402
from xma2_ops.config import GemmParams  # noqa: E402
from xma2_ops.device import cell_levels, program_cells  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_ON = DeviceModel(on_off=8.0, sigma_abs=0.02, sigma_rel=0.05, saf_low=0.02, saf_high=0.02, nu_mean=0.02,
                     nu_std=0.01, read_time=3600.0, sigma_read=0.01, seed=7, frac_bits=6)


@pytest.fixture(scope="module")
def tk():
    be = dispatch._BACKENDS.get("triton")
    if be is None:
        pytest.skip("xma2_ops.backends.triton did not load")
    if DEVICE not in be.supported_devices:
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set: no interpreter for CPU tensors")
    from xma2_ops.backends.triton import ops as triton_kernels
    assert be.cell_tile_sums is triton_kernels.cell_tile_sums and be.cell_mvm_kernel is triton_kernels.cell_mvm
    return triton_kernels


def _case(seed: int):
    """A random GEMM config (8-bit DAC chunks and cells, row tiles above 64 rows: streamed K, lossy,
    saturating and ideal ADCs) with at most 3 row tiles, input codes, and cells with every non-ideality."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    rows = rng.choice([3, 16, 33, 64, 70, 130])
    cb, db = rng.choice([1, 2, 3, 5, 8]), rng.choice([1, 2, 4, 8])
    pmax = rows * (2 ** db - 1) * (2 ** cb - 1)
    adc_bits = rng.choice([None, 1, 4, 8, 12])
    clip = rng.choice([pmax, max(1, pmax // 3), pmax * 2, 7])
    levels = 0 if adc_bits is None else min(2 ** adc_bits - 1, clip)
    signed = rng.random() < 0.5
    p = GemmParams(rows, rng.randint(1, 40), rng.randint(2, 10), signed, db, rng.randint(2, 10), cb, levels, clip)
    k = rng.randint(1, min(3 * rows, 150))
    m, n = rng.randint(1, 40), rng.randint(1, 70)
    dev = dataclasses.replace(ALL_ON, seed=seed, frac_bits=rng.randint(0, 12))
    qw, qx = 2 ** (p.weight_bits - 1) - 1, 2 ** p.x_bits - 1
    w = torch.randint(-qw, qw + 1, (k, n), generator=gen, dtype=torch.int32)
    x = torch.randint(-qx if signed else 0, qx + 1, (m, k), generator=gen, dtype=torch.int32)
    x = torch.where(torch.rand(m, k, generator=gen) < 0.3, torch.full_like(x, qx), x)  # saturate the ADC
    cells = program_cells(w, p.weight_bits, p.cell_bits, dev, rng.randint(0, 3), 0)
    return p, x, cells.read(rng.randint(0, 2)), dev.frac_bits, gen


@pytest.mark.parametrize("seed", range(26))
def test_cell_tile_sums_bit_exact(tk, seed):
    p, x, gq, f, _ = _case(seed)
    got = tk.cell_tile_sums(x.to(DEVICE), gq.to(DEVICE), p, f)
    assert got.dtype == torch.int64 and got.device.type == DEVICE
    assert torch.equal(got.cpu(), ref.cell_tile_sums(x, gq, p, f))


def test_cases_cover_every_kernel_path():
    """The random cases above reach each branch of the cell kernel (else the test proves less)."""
    seen = set()
    for seed in range(26):
        p, _, gq, _, _ = _case(seed)
        seen |= {("ideal", p.adc_levels == 0), ("x8", p.adc_levels > 0 and p.dac_bits == 8),
                 ("streamed", p.rows > 64), ("signed", p.input_signed),
                 ("digits>1", int(gq.max()) >= 128), ("saturates", p.adc_levels > 0 and p.adc_clip < p.pmax)}
    assert seen >= {(name, True) for name in ("ideal", "x8", "streamed", "signed", "digits>1", "saturates")}


@pytest.mark.parametrize("seed", range(6))
def test_ideal_cells_give_the_integer_tile_sums(tk, seed):
    """Gq = L 2^F (an ideal device) gives exactly SPEC 3's T_int (ideal ADC: times 2^F)."""
    p, x, _, f, gen = _case(100 + seed)
    qw = 2 ** (p.weight_bits - 1) - 1
    w = torch.randint(-qw, qw + 1, (x.shape[1], 9), generator=gen, dtype=torch.int32)
    gq = (cell_levels(w, p.weight_bits, p.cell_bits) << f).to(torch.int32)
    want = tk.tile_sums(x.to(DEVICE), w.to(DEVICE), p).cpu() * (2 ** f if p.adc_levels == 0 else 1)
    assert torch.equal(tk.cell_tile_sums(x.to(DEVICE), gq.to(DEVICE), p, f).cpu(), want)


def test_strided_conductances(tk):
    """The kernel reads the conductances through their four strides and x through its two."""
    p, x, gq, f, _ = _case(3)
    g_nc = gq.permute(3, 2, 1, 0).contiguous().to(DEVICE).permute(3, 2, 1, 0)
    x_nc = x.T.contiguous().to(DEVICE).T
    assert not g_nc.is_contiguous() and not x_nc.is_contiguous()
    assert torch.equal(tk.cell_tile_sums(x_nc, g_nc, p, f).cpu(), ref.cell_tile_sums(x, gq, p, f))


@pytest.mark.parametrize("seed", range(8))
def test_cell_mvm_matches_reference(tk, seed):
    """coef * T per row tile in float64, row tile outer, then base, then task (as BackendBase.cell_mvm)."""
    p, x, gb, f, gen = _case(200 + seed)
    k, n = gb.shape[2], gb.shape[3]
    gt = program_cells(torch.randint(-3, 4, (k, n), generator=gen, dtype=torch.int32), p.weight_bits, p.cell_bits,
                       dataclasses.replace(ALL_ON, seed=seed), 0, 1).read()
    tr = -(-k // p.rows)
    dtype = (torch.float64, torch.float32)[seed % 2]
    mask = torch.randint(0, 3, (tr, n), generator=gen).double() / 2  # 0, 1/2, 1: skipped paths too
    coef_b = ((1 - mask) * torch.rand(tr, n, generator=gen, dtype=torch.float64)).to(dtype)
    coef_t = (mask * torch.rand(tr, n, generator=gen, dtype=torch.float64)).to(dtype)
    with_task = seed % 4 < 2
    args = (x, gb, gt if with_task else None, coef_b, coef_t if with_task else None)
    want = dispatch._BACKENDS["reference"].cell_mvm(*args, p, f)
    got = tk.cell_mvm(*(a.to(DEVICE) if a is not None else None for a in args), p, f)
    assert got.dtype == dtype and got.shape == (x.shape[0], n)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got.cpu(), want, **tol)


def _layer_case(seed: int, conv: bool):
    g = torch.Generator().manual_seed(seed)
    cfg = XbarConfig(rows=20, cols=8, weight_bits=6, cell_bits=2, input_bits=5, dac_bits=2,
                     adc_bits=(5, None)[seed % 2], device=dataclasses.replace(ALL_ON, seed=seed))
    shape_x, shape_w = ((2, 3, 5, 4), (11, 3, 3, 3)) if conv else ((6, 45), (13, 45))
    x = torch.randn(*shape_x, generator=g, dtype=torch.float64)
    w, wt = torch.randn(2, *shape_w, generator=g, dtype=torch.float64)
    bias = torch.randn(shape_w[0], generator=g, dtype=torch.float64)
    tr, tc = cfg.tiles(w[0].numel(), shape_w[0])
    mask = torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64)[torch.randint(0, 3, (tr, tc), generator=g)]
    alpha = 0.5 + torch.rand(tr, shape_w[0], generator=g, dtype=torch.float64)
    return cfg, x, w, wt, bias, mask, alpha


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("seed", range(2))
def test_layers_with_device_triton_vs_reference(tk, conv, seed):
    """xbar_linear / xbar_conv2d on non-ideal cells: outputs and gradients (the coefficient gradients
    use the backend's cell_tile_sums), backend triton vs reference, float64, 1e-12 relative."""
    cfg, x, w, wt, bias, mask, alpha = _layer_case(seed, conv)
    fn = xma2_ops.xbar_conv2d if conv else xma2_ops.xbar_linear

    def run(backend: str, dev: str):
        leaves = [t.to(dev).requires_grad_() for t in (x, w, wt, mask, alpha)]
        kw = dict(padding=1) if conv else {}
        y = fn(leaves[0], leaves[1], bias.to(dev), config=cfg, task_weight=leaves[2], pe_mask=leaves[3],
               col_scale=leaves[4], backend=backend, **kw)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=dev).view_as(y))
        return [y.detach().cpu()] + [t.grad.cpu() for t in leaves]

    got, want = run("triton", DEVICE), run("reference", "cpu")
    ideal_cfg = dataclasses.replace(cfg, device=None)
    assert not torch.allclose(fn(x, w, config=ideal_cfg, backend="reference", **(dict(padding=1) if conv else {})),
                              fn(x, w, config=cfg, backend="reference", **(dict(padding=1) if conv else {})))
    for name, a, b in zip(("y", "x", "w", "wt", "mask", "alpha"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * max(1.0, float(b.abs().max())), msg=name)


# ------------------------------------------------------------------ argument checks
def test_cell_argument_checks(tk):
    p = GemmParams(16, 4, 4, False, 2, 5, 2, 7, 30)
    x = torch.zeros(3, 20, dtype=torch.int32, device=DEVICE)
    g = torch.zeros(2, p.slices, 20, 5, dtype=torch.int32, device=DEVICE)
    assert tk.cell_tile_sums(x, g, p, 4).shape == (2, 3, 5)
    assert tk.cell_tile_sums(x[:0], g, p, 4).shape == (2, 0, 5)
    cases = [
        (lambda: tk.cell_tile_sums(x, g.float(), p, 4), "gq must be int32"),
        (lambda: tk.cell_tile_sums(x, g[:, :1], p, 4), r"S = 2 slices"),
        (lambda: tk.cell_tile_sums(x[:, :19], g, p, 4), "K = 19"),
        (lambda: tk.cell_tile_sums(x, g[0], p, 4), r"gq must be int32 \[2, S, K, N\]"),
        (lambda: tk.cell_tile_sums(x.long(), g, p, 4), "x_codes must be int32"),
        (lambda: tk.cell_tile_sums(x, g, p, 17), "frac_bits"),
        (lambda: tk.cell_tile_sums(x, g - 1, p, 4), "gq must hold conductances >= 0, got -1"),
        (lambda: tk.cell_tile_sums(x - 1, g, p, 4), "x_codes must hold codes"),
        (lambda: tk.cell_tile_sums(x, g, dataclasses.replace(p, dac_bits=9), 4), "dac_bits"),
        (lambda: tk.cell_mvm(x, g, None, torch.zeros(2, 5, device=DEVICE, dtype=torch.int64), None, p, 4),
         "coef_b must be float32 or float64"),
        (lambda: tk.cell_mvm(x, g, None, torch.zeros(1, 5, device=DEVICE), None, p, 4), r"coef_b must be \[Tr, N\]"),
        (lambda: tk.cell_mvm(x, g, g, torch.zeros(2, 5, device=DEVICE), None, p, 4), "gt and coef_t"),
        (lambda: tk.cell_mvm(x, g, g[:, :, :, :4], torch.zeros(2, 5, device=DEVICE), torch.zeros(2, 5, device=DEVICE),
                             p, 4), "gt must be int32 of shape"),
        (lambda: tk.cell_mvm(x, g, g - 1, torch.zeros(2, 5, device=DEVICE), torch.zeros(2, 5, device=DEVICE), p, 4),
         "gt must hold conductances >= 0"),
    ]
    if DEVICE == "cuda":
        cases.append((lambda: tk.cell_tile_sums(x, g.cpu(), p, 4), "one device"))
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


@pytest.mark.parametrize("levels", [0, (1 << 24) - 1])
def test_refuses_conductances_that_could_overflow(tk, levels):
    """Partial sums or tile sums that could leave int64 are refused (ideal ADC: the shift-and-add of
    P_F; lossy ADC: 2 P_F n + clip 2^F), and one step below the bound runs."""
    p = GemmParams(1024, 4, 16, False, 8, 16, 1, levels, 1 << 32)
    x = torch.zeros(1, 1024, dtype=torch.int32, device=DEVICE)
    g = torch.zeros(2, p.slices, 1024, 1, dtype=torch.int32, device=DEVICE)
    g[0, 0, 0, 0] = 2 ** 31 - 1
    with pytest.raises(RuntimeError, match="overflow int64"):
        tk.cell_tile_sums(x, g, p, 16)
    g[0, 0, 0, 0] = 1 << 8  # small conductances, few rows (the interpreter is slow): no refusal
    assert tk.cell_tile_sums(x[:, :40], g[:, :, :40], p, 0).shape == (1, 1, 1)


# ------------------------------------------------------------------ the triton_ops
def _op_args(gen):
    p = GemmParams(8, 4, 4, True, 2, 5, 2, 7, 30)
    x = torch.randint(-7, 8, (3, 10), generator=gen, dtype=torch.int32)
    gq = torch.randint(0, 300, (2, 2, 10, 5), generator=gen, dtype=torch.int32)
    cb = torch.rand(2, 5, dtype=torch.float64, generator=gen)
    return p, [t.to(DEVICE) for t in (x, gq, gq.flip(0).contiguous(), cb, 2 * cb)]


def test_cell_ops_are_triton_ops(tk):
    from torch._library.triton import triton_ops_to_kernels
    for name in ("triton_cell_tile_sums", "triton_cell_mvm"):
        assert f"xma2_ops::{name}" in triton_ops_to_kernels  # registered by torch.library.triton_op
        assert isinstance(getattr(torch.ops.xma2_ops, name).default, torch._ops.OpOverload)


@pytest.mark.parametrize("op", ["triton_cell_tile_sums", "triton_cell_mvm"])
def test_opcheck_cell_ops(tk, op):
    """Schema, fake impl, autograd registration and the AOTAutograd decomposition (the kernel on real
    tensors at run time) agree with eager calls."""
    p, (x, gq, gt, cb, ct) = _op_args(torch.Generator().manual_seed(1))
    args = (x, gq, *p.as_args(), 4, 2) if op == "triton_cell_tile_sums" else (x, gq, gt, cb, ct, *p.as_args(), 4, 2)
    torch.library.opcheck(getattr(torch.ops.xma2_ops, op).default, args)
    if op == "triton_cell_tile_sums":
        assert torch.equal(torch.ops.xma2_ops.triton_cell_tile_sums(*args).cpu(),
                           ref.cell_tile_sums(x.cpu(), gq.cpu(), p, 4))


def test_entry_points_call_the_triton_ops(tk):
    from helpers import OpLog as Log

    p, (x, gq, gt, cb, ct) = _op_args(torch.Generator().manual_seed(2))
    with Log() as log:
        y = tk.cell_mvm(x, gq, gt, cb, ct, p, 4)
        t = tk.cell_tile_sums(x, gq, p, 4)
    assert "xma2_ops.triton_cell_mvm.default" in log.ops and "xma2_ops.triton_cell_tile_sums.default" in log.ops
    assert torch.equal(y, tk.cell_mvm(x, gq, gt, cb, ct, p, 4)) and torch.equal(t, tk.cell_tile_sums(x, gq, p, 4))


def test_functional_trace(tk):
    """Under FunctionalTensorMode (what torch.compile's AOTAutograd runs) the op decomposes into its body:
    in interpreter mode the opaque twin, which computes the right values when the graph runs."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    p, (x, gq, gt, cb, ct) = _op_args(torch.Generator().manual_seed(3))
    args = (x, gq, gt, cb, ct, *p.as_args(), 4, 2)
    gm = make_fx(dispatch_functionalize(lambda *a: torch.ops.xma2_ops.triton_cell_mvm(*a)), tracing_mode="fake")(*args)
    code = gm.code
    if tk.INTERPRET:
        assert "triton_cell_mvm_interpreted" in code
    else:
        assert "triton_kernel_wrapper_functional" in code
    assert torch.equal(gm(*args), torch.ops.xma2_ops.triton_cell_mvm(*args))


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only: re-JITs the kernels to trace them")
def test_compiled_triton_body_traces_to_the_kernel(tk, monkeypatch):
    """The body that runs with compiled Triton (on a GPU): traced with fake tensors, it becomes a
    triton_kernel_wrapper_functional node holding the cell kernel with the launch's arguments."""
    import triton
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from triton.runtime.interpreter import InterpretedFunction
    from xma2_ops.backends.triton import kernels
    for mod in (kernels, tk):  # the kernels' module (their helpers) and the ops' (the kernels launched)
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, InterpretedFunction):
                monkeypatch.setattr(mod, name, triton.runtime.jit.JITFunction(obj.fn))
    monkeypatch.setattr(tk, "INTERPRET", False)
    p, (x, gq, gt, cb, ct) = _op_args(torch.Generator().manual_seed(4))
    args = (x, gq, gt, cb, ct, *p.as_args(), 4, 2)
    gm = make_fx(dispatch_functionalize(lambda *a: torch.ops.xma2_ops.triton_cell_mvm(*a)), tracing_mode="fake")(*args)
    node = next(nd for nd in gm.graph.nodes if "triton_kernel_wrapper_functional" in str(nd.target))
    kw = node.kwargs["kwargs"]
    assert kw["G_DIGITS"] == 2 and kw["HAS_T"] and kw["MVM"] and kw["adc_den"] == 2 * (30 << 4)
    assert {"sgq", "sgj", "sgk", "sgn", "XW", "IDEAL"} <= set(kw)  # the cell kernel's arguments
