import pytest
import torch
from torch import nn

torch.set_num_threads(2)


class TinyResNet(nn.Module):
    """Stem, one residual unit with a downsample, a plain residual unit, pool, fc."""

    def __init__(self, c=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.a1 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
                                nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c))
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 1, stride=2), nn.BatchNorm2d(2 * c))
        self.b1 = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2), nn.BatchNorm2d(2 * c), nn.ReLU6(),
                                nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c), nn.BatchNorm2d(2 * c))
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.a1(x) + self.down(x))
        x = x + self.b1(x)  # residual add with no ReLU after
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def tiny_resnet():
    torch.manual_seed(0)
    return randomize_bn(TinyResNet())


@pytest.fixture(scope="session")
def tiny_artifact():
    """A briefly calibrated TinyResNet artifact (W4A4) with scattered WAPS groups."""
    from tests.compile_helpers import calibrated, scramble_groups
    torch.manual_seed(0)
    art = calibrated(randomize_bn(TinyResNet()), (1, 16, 16))
    return scramble_groups(art, seed=1)
