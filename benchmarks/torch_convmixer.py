"""An independent PyTorch ConvMixer, written from the paper's definition, for parity tests.

Two spellings of the same network: timm's module names (stem, blocks, pooling, head) and the
authors' single flat nn.Sequential.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def _stem(h: int, p: int, act) -> list[nn.Module]:
    return [nn.Conv2d(3, h, kernel_size=p, stride=p), act(), nn.BatchNorm2d(h)]


def _block(h: int, k: int, act) -> nn.Sequential:
    depthwise = nn.Sequential(
        nn.Conv2d(h, h, k, groups=h, padding="same"), act(), nn.BatchNorm2d(h)
    )
    return nn.Sequential(
        Residual(depthwise), nn.Conv2d(h, h, kernel_size=1), act(), nn.BatchNorm2d(h)
    )


class TimmConvMixer(nn.Module):
    """ConvMixer-h/d with timm's module names."""

    def __init__(self, h, d, k, p, num_classes, activation="gelu"):
        super().__init__()
        act = ACTIVATIONS[activation]
        self.stem = nn.Sequential(*_stem(h, p, act))
        self.blocks = nn.Sequential(*[_block(h, k, act) for _ in range(d)])
        self.pooling = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(h, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooling(self.blocks(self.stem(x))).flatten(1))


def authors_convmixer(h, d, k, p, num_classes, activation="gelu") -> nn.Sequential:
    """The authors' definition: one nn.Sequential from the patch conv to the linear head."""
    act = ACTIVATIONS[activation]
    return nn.Sequential(
        *_stem(h, p, act),
        *[_block(h, k, act) for _ in range(d)],
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(h, num_classes),
    )


def randomize_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=g)))
    return model.eval()


def logits(model: nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
    """Logits of NHWC float32 images (as our models take them)."""
    with torch.no_grad():
        x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()
        return model(x).numpy()
