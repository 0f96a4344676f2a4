"""Which implementation of each operation a model runs: the one place 'auto' is resolved.

The choice depends on the devices the model will run on (their platform and count), the compute
dtype and the remat policy:

- CPU, one device, the kernels built: the CPU kernels (`ops/cpu/`) for the depthwise conv, and in
  float32 for the pointwise product, activation+BatchNorm, patch embedding and eval-mode layers;
  several times faster than XLA's CPU code (docs/performance.md). They run on one device's
  whole operand, so with several devices the depthwise conv is the shifted sum (`ops/shift.py`)
  and the rest XLA's.
- TPU and GPU: XLA (`ops/xla.py`), what their compilers fuse and tile; no measurement has yet
  shown a hand-written kernel faster there (docs/accelerators.md).
- remat 'dots' keeps the pointwise products' outputs, which its policy only sees as XLA dots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from convmixer_jax.ops.cpu import native

DEPTHWISE = ("xla", "shift", "native")
POINTWISE = ("xla", "native")
REMATS = ("none", "block", "dots")


@dataclasses.dataclass(frozen=True)
class Impls:
    """The implementations a model runs."""

    depthwise: str  # 'xla', 'shift' or 'native'
    pointwise: str  # 'xla' or 'native': the pointwise product and activation+BatchNorm
    layers: bool = False  # whole layers on the CPU kernels: patch embedding, fused eval layers
    scan: bool = True  # the mixer blocks as one lax.scan (unrolled when they are custom calls)

    @property
    def patch(self) -> str:
        """The patch embedding: the flattened patches' product on the kernels with `layers`."""
        return "native" if self.layers else "xla"


def resolve(
    depthwise: str = "auto",
    pointwise: str = "auto",
    *,
    dtype=jnp.float32,
    remat: str = "none",
    scan: bool = True,
    devices=None,
) -> Impls:
    """The concrete implementations for `depthwise` and `pointwise` ('auto' or a name) on
    `devices` (default: all of this process's JAX devices); ValueError for a bad choice."""
    devices = jax.devices() if devices is None else list(devices)
    platform, count = devices[0].platform, len(devices)
    float32 = jnp.dtype(dtype) == jnp.float32
    for kind, impl, choices in (
        ("depthwise", depthwise, DEPTHWISE),
        ("pointwise", pointwise, POINTWISE),
    ):
        if impl not in ("auto", *choices):
            names = ", ".join(choices)
            raise ValueError(f"unknown {kind} impl {impl!r}; choose one of auto, {names}")
        if impl == "native" and platform != "cpu":
            raise ValueError(f"{kind} impl 'native' runs on CPU only; use 'auto' or 'xla'")
    if remat not in REMATS:
        raise ValueError(f"unknown remat {remat!r}; choose one of {list(REMATS)}")
    if remat == "dots" and pointwise == "native":
        raise ValueError(
            "remat 'dots' cannot see pointwise_impl 'native' products; use remat "
            "'block' or 'none', or pointwise_impl 'xla' or 'auto'"
        )
    kernels = platform == "cpu" and count == 1 and native.available()
    if depthwise == "auto":
        depthwise = ("native" if kernels else "shift") if platform == "cpu" else "xla"
    if pointwise == "auto":
        pointwise = "native" if kernels and float32 and remat != "dots" else "xla"
    layers = float32 and depthwise == pointwise == "native"
    return Impls(depthwise, pointwise, layers, scan and not layers)
