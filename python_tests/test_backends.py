"""The backends package's API: the Backend enum, not_supported_reasons, the default per device."""
import pytest
import torch

import xma2_ops
from xma2_ops.backends import Backend, available_backends, get_backend
from xma2_ops.backends.dispatch import PRIORITIES


def test_backend_enum_names_every_backend_and_works_as_a_name():
    assert [b.value for b in Backend] == list(available_backends(with_reasons=True))
    x, w = torch.rand(3, 20), torch.randn(4, 20)
    cfg = xma2_ops.XbarConfig(rows=8, cols=2)
    assert torch.equal(xma2_ops.xbar_linear(x, w, config=cfg, backend=Backend.CPU),
                       xma2_ops.xbar_linear(x, w, config=cfg, backend="cpu"))
    assert get_backend(Backend.REFERENCE, torch.device("cpu")).name == "reference"


def test_not_supported_reasons():
    ref = get_backend("reference", torch.device("cpu"))
    assert ref.not_supported_reasons(torch.device("cpu"), cells=True) == []
    reasons = ref.not_supported_reasons(torch.device("meta"))
    assert len(reasons) == 1 and "runs on ['cpu', 'cuda'] tensors" in reasons[0]
    with pytest.raises(ValueError, match="runs on"):
        get_backend("reference", torch.device("meta"))


def test_default_backend_per_device():
    assert get_backend(None, torch.device("cpu")).name == next(b.value for b in PRIORITIES["cpu"]
                                                              if b.value in available_backends())
