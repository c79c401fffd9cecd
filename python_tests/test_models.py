"""Built-in ResNets: torchvision-compatible state_dict keys and shapes, and a crossbar forward."""
import pytest
import torch

import xma2_ops
from xma2_ops.models import resnet18, resnet50

# torchvision.models.resnet18()/resnet50(): parameter counts and state_dict sizes (weights,
# biases, BN running stats and num_batches_tracked), as published for the ImageNet models.
TORCHVISION = {
    "resnet18": dict(params=11_689_512, keys=122, fc=(1000, 512)),
    "resnet50": dict(params=25_557_032, keys=320, fc=(1000, 2048)),
}


@pytest.mark.parametrize("name,make", [("resnet18", resnet18), ("resnet50", resnet50)])
def test_torchvision_key_compatibility(name, make):
    model = make()
    sd = model.state_dict()
    want = TORCHVISION[name]
    assert sum(p.numel() for p in model.parameters()) == want["params"]
    assert len(sd) == want["keys"]
    assert tuple(sd["fc.weight"].shape) == want["fc"]
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 7, 7)
    for key in ("bn1.running_mean", "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.running_var", "layer4.1.bn2.bias"):
        assert key in sd, key
    if name == "resnet50":
        assert tuple(sd["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
        assert tuple(sd["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)  # v1.5: stride on the 3x3
        assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
    else:
        assert "layer1.0.downsample.0.weight" not in sd
    # a checkpoint saved from one instance loads strictly into another, and into the converted model
    other = make()
    other.load_state_dict(sd)
    converted = xma2_ops.convert(make(), xma2_ops.XbarConfig())
    converted.load_state_dict(sd, strict=False)
    assert torch.equal(converted.layer1[0].conv1.weight, model.layer1[0].conv1.weight)


def test_crossbar_forward_on_random_weights():
    torch.manual_seed(0)
    model = resnet18(num_classes=10, cifar=True)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        y_float = model(x)
        xma2_ops.convert(model, xma2_ops.XbarConfig(weight_bits=None, input_bits=None, adc_bits=None))
        torch.testing.assert_close(model(x), y_float, rtol=1e-4, atol=1e-4)  # the ideal crossbar is the float net
        layers = [m for m in model.modules() if isinstance(m, (xma2_ops.XbarConv2d, xma2_ops.XbarLinear))]
        assert len(layers) == 21  # 20 convs (3 of them downsampling 1x1) and the head
        for m in layers:
            m.config = xma2_ops.XbarConfig(rows=64, cols=64)  # quantised, lossy 8-bit ADC
        y = model(x)
    assert y.shape == (2, 10) and bool(torch.isfinite(y).all()) and not torch.equal(y, y_float)
