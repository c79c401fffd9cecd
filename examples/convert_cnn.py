"""Convert a small CNN to crossbar layers and compare float, ideal-crossbar and quantised outputs.

    python examples/convert_cnn.py
"""
import copy

import torch
import torch.nn as nn

import xma2_ops


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        y_float = model(x)
        configs = {
            "ideal crossbar": xma2_ops.XbarConfig(weight_bits=None, input_bits=None, adc_bits=None),
            "default (8b W/X, 2b cells, 1b DAC, 8b ADC)": xma2_ops.XbarConfig(),
            "4-bit ADC": xma2_ops.XbarConfig(adc_bits=4),
            "lossless ADC": xma2_ops.XbarConfig(adc_bits=None),
        }
        print(f"backends available: {xma2_ops.available_backends()}")
        for name, cfg in configs.items():
            xmodel = xma2_ops.convert(copy.deepcopy(model), cfg)
            y = xmodel(x)
            rel = float((y - y_float).norm() / y_float.norm())
            print(f"{name:45s} relative error vs float: {rel:.2e}")


if __name__ == "__main__":
    main()
