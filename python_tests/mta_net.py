"""The small two-conv crossbar network shared by the multi-task tests."""
import torch
import torch.nn as nn

from xma2_ops import XbarConfig, convert

CFG = XbarConfig(rows=32, cols=32)


class Net(nn.Module):
    """c1: K=9, N=8 (1x1 PE grid of 32x32); c2: K=72, N=16 (3x1 PE grid); BN; a digital head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, 2, 1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, 2, 1, bias=False)
        self.b2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return convert(Net(), CFG, skip=lambda n, m: n == "fc")
