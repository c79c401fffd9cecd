"""GPU backends ("cuda" C++/CUDA kernels, "triton") against the reference; skipped without a GPU."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import xma2_ops  # noqa: E402
from xma2_ops.backends import BackendBase, dispatch, reference  # noqa: E402
from xma2_ops.config import XbarConfig  # noqa: E402
from xbar_cases import CONFIGS, make_codes, make_mvm_case, make_params, make_shape  # noqa: E402

GPU_BACKENDS = [b for b in ("cuda", "triton") if b in dispatch.available_backends()]


@pytest.fixture(autouse=True)
def no_tf32():
    """Float convolutions (ideal mode, straight-through gradients) must not round to TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_default_backend_on_cuda():
    """backend=None on CUDA tensors: Triton (until the CUDA kernel is measured on a GPU), else CUDA."""
    want = "triton" if "triton" in dispatch.available_backends() else "cuda"
    assert dispatch.get_backend(None, torch.device("cuda")).name == want


def test_cuda_backend_built():
    """Fails where a CUDA build was asked for (XMA2_CUDA=1, as scripts/gpu_check.sh does), else skips."""
    if "cuda" not in dispatch.available_backends():
        message = "the extension was built without its CUDA kernels (set CUDA_HOME / XMA2_CUDA=1)"
        if os.environ.get("XMA2_CUDA") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _big_shape(case: int, g: torch.Generator) -> tuple[int, int, int]:
    m, k, n = make_shape(case, g)
    return 5 * m + 3, 4 * k + 1, 3 * n + 2  # several blocks along every dimension


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", range(len(CONFIGS)))
def test_tile_sums_bit_exact(backend, case):
    g = torch.Generator().manual_seed(500 + case)
    cfg, p = make_params(CONFIGS[case])
    m, k, n = _big_shape(case, g)
    x, w = make_codes(cfg, p.input_signed, m, k, n, g)
    got = dispatch.get_backend(backend, torch.device("cuda")).tile_sums(x.cuda(), w.cuda(), p)
    assert got.dtype == torch.int64 and got.is_cuda
    assert torch.equal(got.cpu(), reference.tile_sums(x, w, p))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", range(len(CONFIGS)))
def test_mvm_matches_reference(backend, case):
    g = torch.Generator().manual_seed(600 + case)
    args, p, dtype, tol = make_mvm_case(case, _big_shape(case + 1, g), g)
    want = reference.mvm(*args, p)
    got = dispatch.get_backend(backend, torch.device("cuda")).mvm(
        *(a.cuda() if a is not None else None for a in args), p)
    assert got.dtype == dtype and got.is_cuda
    torch.testing.assert_close(got.cpu(), want, **tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS + [None])
@pytest.mark.parametrize("case", [0, 1, 6, 8])
def test_conv2d_matches_reference(backend, case):
    g = torch.Generator().manual_seed(700 + case)
    cfg, _ = make_params(CONFIGS[case])
    cin, cout = 6, 37
    x = torch.randn(3, cin, 9, 8, generator=g, dtype=torch.float64)
    if not cfg.input_signed:
        x = x.abs()
    w, wt = torch.randn(2, cout, cin, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    tr, tc = cfg.tiles(cin * 9, cout)
    mask = torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64)[torch.randint(0, 3, (tr, tc), generator=g)]
    alpha = 0.5 + torch.rand(tr, cout, generator=g, dtype=torch.float64)

    def run(backend_name, dev: str):
        leaves = [t.to(dev).requires_grad_() for t in (x, w, wt, mask, alpha)]
        y = xma2_ops.xbar_conv2d(leaves[0], leaves[1], bias.to(dev), stride=(1, 2), padding=1, config=cfg,
                                 task_weight=leaves[2], pe_mask=leaves[3], col_scale=leaves[4],
                                 backend=backend_name)
        y.backward(torch.ones_like(y))
        return [y.detach().cpu()] + [t.grad.cpu() for t in leaves]

    for got, want in zip(run(backend, "cuda"), run("reference", "cpu")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_float32_linear_and_long_row_tiles(backend):
    """float32 end to end, rows > 128 and K spanning several long row tiles."""
    g = torch.Generator().manual_seed(800)
    cfg = XbarConfig(rows=1000, cols=96, weight_bits=8, cell_bits=2, input_bits=8, dac_bits=2, adc_bits=7)
    x = torch.randn(70, 2500, generator=g)
    w = torch.randn(200, 2500, generator=g)
    got = xma2_ops.xbar_linear(x.cuda(), w.cuda(), config=cfg, backend=backend)
    want = xma2_ops.xbar_linear(x, w, config=cfg, backend="reference")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif("cuda" not in dispatch.available_backends(), reason="built without the CUDA kernels")
def test_cuda_op_checks_and_layouts():
    cfg, p = make_params(CONFIGS[3])
    x, w = make_codes(cfg, p.input_signed, 40, 70, 30, torch.Generator().manual_seed(900))
    op = torch.ops.xma2_ops.xbar_tile_sums
    want = reference.tile_sums(x, w, p)
    # non-contiguous codes are made contiguous by the binding
    w_nc = w.T.contiguous().cuda().T
    assert torch.equal(op(x.cuda(), w_nc, *p.as_args()).cpu(), want)
    with pytest.raises(RuntimeError, match="w_codes must be on"):
        op(x.cuda(), w, *p.as_args())
    with pytest.raises(RuntimeError, match="x_codes must hold codes"):
        op(torch.full_like(x, 10_000).cuda(), w.cuda(), *p.as_args())
    with pytest.raises(RuntimeError, match="coef_b must be"):
        torch.ops.xma2_ops.xbar_mvm(x.cuda(), w.cuda(), None, torch.zeros(1, 30, device="cuda"), None,
                                    *p.as_args())
    empty = op(x[:0].cuda(), w.cuda(), *p.as_args())
    assert empty.shape == (want.shape[0], 0, 30)
