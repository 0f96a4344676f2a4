"""How much work a ConvMixer is: FLOPs and parameter counts."""

from __future__ import annotations

import math

import jax
from flax import nnx


def forward_flops(
    *,
    width: int,
    depth: int,
    kernel_size: int,
    patch_size: int,
    num_classes: int,
    image_size: int,
    in_channels: int = 3,
) -> int:
    """Forward FLOPs (2 x multiply-adds) per image, depthwise convs included.

    (timm's published GMACs leave the depthwise convs out; this count is what MFU needs.)
    """
    tokens = (image_size // patch_size) ** 2
    stem = tokens * in_channels * patch_size**2 * width
    blocks = depth * tokens * (kernel_size**2 * width + width * width)
    return 2 * (stem + blocks + width * num_classes)


def count_params(model_or_state) -> int:
    """Number of trainable parameters (BatchNorm running statistics excluded)."""
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
