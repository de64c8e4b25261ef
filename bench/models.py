"""Four small CNNs and a small vision transformer for Fashion-MNIST (input float32 N×1×28×28,
normalised; output N×10 logits).

All are built from the blocks WAPS-Quant must handle in real networks: torchvision-style
residual BasicBlocks with BN and projection shortcuts, MobileNetV2 inverted residuals
with depthwise convolutions and ReLU6, and MobileNetV3 inverted residuals with
hardswish and squeeze-and-excitation (a pooled, hardsigmoid-gated channel multiply), and
channel concatenation: SqueezeNet fire modules and a DenseNet dense block, with
ceil-mode max pooling.
ResNet widths are multiples of 16; the MobileNets keep their family's 24-wide stage,
with expansions picked so every hidden width is a multiple of 16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias: BN follows) + BN, 'same' padding for odd k."""
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        # 1×1 conv + BN projection only where the identity cannot be added as is.
        self.downsample: nn.Module | None = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class FashionResNet(nn.Module):
    """Stem 1→16 @28², stages 16 @28² (1 block), 32 @14² (2), 64 @7² (2), pool, Linear(64, 10)."""

    def __init__(self, num_classes: int = 10, blocks: tuple[int, int, int] = (1, 2, 2)) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, 16, 3), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        cin = 16
        for cout, stride, count in zip((16, 32, 64), (1, 2, 2), blocks):
            stage = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(count - 1)]
            layers.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand-BN-ReLU6, 3×3 depthwise-BN-ReLU6, 1×1 project-BN (linear).

    The input is added back when stride is 1 and channels are unchanged.
    """

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
            *_conv_bn(hidden, cout, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class FashionMobileNetV2(nn.Module):
    """Stem 1→16 @28²; inverted residuals 16→24 (s2) →24 →32 (s2) →32 →64 @7²;
    1×1 conv to 128, pool, Linear(128, 10). Residual adds in the two 24→24 / 32→32 blocks."""

    # (out channels, stride, expansion)
    CONFIG: tuple[tuple[int, int, int], ...] = (
        (24, 2, 4),
        (24, 1, 6),
        (32, 2, 6),
        (32, 1, 6),
        (64, 1, 6),
    )

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(1, 16, 3), nn.ReLU6(inplace=True)]
        cin = 16
        for cout, stride, expand in self.CONFIG:
            layers.append(InvertedResidual(cin, cout, stride, expand))
            cin = cout
        layers += [*_conv_bn(cin, 128, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SqueezeExcitation(nn.Module):
    """torchvision's SE: x * hardsigmoid(fc2(relu(fc1(avg_pool(x))))), fc = 1×1 conv with bias.

    x float32 N×C×H×W → same shape; the gate is N×C×1×1 in [0, 1].
    """

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.relu(self.fc1(s))))


class InvertedResidualV3(nn.Module):
    """MobileNetV3 block: [1×1 expand-BN-act], k×k depthwise-BN-act, [SE], 1×1 project-BN.

    The expand conv is left out when the hidden width equals the input's (as in
    torchvision); the input is added back when stride is 1 and channels are unchanged.
    """

    def __init__(self, cin: int, k: int, hidden: int, cout: int, se: bool, act: type[nn.Module],
                 stride: int) -> None:
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if hidden != cin:
            layers += [*_conv_bn(cin, hidden, 1), act(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, k, stride, groups=hidden), act(inplace=True)]
        if se:
            # torchvision squeezes to hidden/4 rounded to 8; here rounded up to 16
            layers.append(SqueezeExcitation(hidden, max(16, -(-hidden // 4 // 16) * 16)))
        layers += _conv_bn(hidden, cout, 1)
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class FashionMobileNetV3(nn.Module):
    """MobileNetV3-small style. Stem 1→16, stride 2, @14² (hardswish); blocks 16 (SE) →24 →24
    (ReLU) →32 (SE, hardswish, s2) @7² →32 →48 (SE, hardswish); 1×1 conv to 128 (hardswish),
    pool, Linear(128, 128)-hardswish-Linear(128, 10). Residual adds in the 16→16 (around an
    SE), 24→24 and 32→32 blocks."""

    # (kernel, hidden, out channels, SE, activation, stride), as torchvision's table
    CONFIG: tuple[tuple[int, int, int, bool, type[nn.Module], int], ...] = (
        (3, 16, 16, True, nn.ReLU, 1),
        (3, 64, 24, False, nn.ReLU, 1),
        (3, 96, 24, False, nn.ReLU, 1),
        (5, 96, 32, True, nn.Hardswish, 2),
        (5, 128, 32, True, nn.Hardswish, 1),
        (5, 128, 48, True, nn.Hardswish, 1),
    )

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        # stride-2 stem as in MobileNetV3: halves the cost of every later layer
        layers: list[nn.Module] = [*_conv_bn(1, 16, 3, 2), nn.Hardswish(inplace=True)]
        cin = 16
        for k, hidden, cout, se, act, stride in self.CONFIG:
            layers.append(InvertedResidualV3(cin, k, hidden, cout, se, act, stride))
            cin = cout
        layers += [*_conv_bn(cin, 128, 1), nn.Hardswish(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(128, 128), nn.Hardswish(inplace=True),
                                        nn.Linear(128, num_classes))
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class Fire(nn.Module):
    """SqueezeNet fire module: 1×1 squeeze-BN-ReLU, then 1×1 and 3×3 expands (BN-ReLU)
    concatenated along channels: cin → 2·expand channels, same H×W."""

    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(*_conv_bn(cin, squeeze, 1), nn.ReLU(inplace=True))
        self.expand1 = nn.Sequential(*_conv_bn(squeeze, expand, 1), nn.ReLU(inplace=True))
        self.expand3 = nn.Sequential(*_conv_bn(squeeze, expand, 3), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return torch.cat([self.expand1(s), self.expand3(s)], 1)


class DenseLayer(nn.Module):
    """DenseNet layer (post-activation): 1×1 conv to 2·growth, 3×3 conv to growth (BN-ReLU
    after each), output concatenated after its input: cin → cin + growth channels."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, 2 * growth, 1), nn.ReLU(inplace=True),
                                  *_conv_bn(2 * growth, growth, 3), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class FashionCatNet(nn.Module):
    """Concatenation-heavy CNN. Stem 1→32 @28², 3×3/2 max pool (ceil mode) to 14²; fire
    modules 32→64 →64 @14²; max pool (ceil mode) to 7²; dense block of three layers,
    growth 16, 64→112 @7²; 1×1 conv to 128, pool, Linear(128, 10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(1, 32, 3), nn.ReLU(inplace=True),
                                   nn.MaxPool2d(3, 2, ceil_mode=True),
                                   Fire(32, 16, 32), Fire(64, 16, 32),
                                   nn.MaxPool2d(3, 2, ceil_mode=True)]
        cin = 64
        for _ in range(3):
            layers.append(DenseLayer(cin, 16))
            cin += 16
        layers += [*_conv_bn(cin, 128, 1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class FashionViT(VisionTransformer):
    """torchvision's VisionTransformer in small: 7×7 patches of the 1-channel image (16 tokens
    and a class token), 4 pre-norm encoder layers of 4 heads, 64 wide, MLP 128 (GELU), the
    class token's head. Only the patch embedding differs from torchvision's (1 input channel)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(image_size=28, patch_size=7, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
                         num_classes=num_classes)
        self.conv_proj = nn.Conv2d(1, self.hidden_dim, self.patch_size, stride=self.patch_size)
        # torchvision's init of the patch embedding: truncated normal over the fan-in
        nn.init.trunc_normal_(self.conv_proj.weight, std=(1 / (self.patch_size ** 2)) ** 0.5)
        nn.init.zeros_(self.conv_proj.bias)


def _init(model: nn.Module) -> None:
    """torchvision's init: Kaiming for convs, BN to identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


MODELS: dict[str, type[nn.Module]] = {
    "fashion_resnet": FashionResNet,
    "fashion_mobilenetv2": FashionMobileNetV2,
    "fashion_mobilenetv3": FashionMobileNetV3,
    "fashion_catnet": FashionCatNet,
    "fashion_vit": FashionViT,
}


def load_pretrained(name: str) -> nn.Module:
    """Build ``name`` from MODELS, load ``bench/weights/{name}.pt``, return it in eval mode."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    model = MODELS[name]()
    state = torch.load(WEIGHTS_DIR / f"{name}.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
