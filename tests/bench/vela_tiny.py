"""A small conv / depthwise / add / pool / linear network for the Vela translator tests and fixture."""
import torch
from torch import nn


class TinyNet(nn.Module):
    """3×32×32 → 10: stem conv (stride 2, pad 1) + BN + ReLU, max-pool (pad 1), a residual unit with
    a depthwise 3×3 (ReLU6) and a grouped (2) 1×1, avg-pool, global mean, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.dw = nn.Sequential(nn.Conv2d(16, 32, 3, 1, 1, groups=16), nn.ReLU6())
        self.pw = nn.Conv2d(32, 16, 1, groups=2)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = torch.relu(x + self.pw(self.dw(x)))
        x = self.avg(x).mean((2, 3))
        return self.fc(x)
