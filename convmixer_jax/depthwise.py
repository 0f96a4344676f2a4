"""Depthwise k x k convolution (stride 1, 'SAME' padding) for ConvMixer's mixer blocks.

ConvMixer spends most of its FLOP-light but memory-heavy time in large-kernel depthwise convs. The
natural JAX spelling, `lax.conv_general_dilated(..., feature_group_count=C)`, is a known slow path
on CPU, and its backward pass is lowered like a dense conv (jax issues #13800, #23713): on a
128x16x16x256 k=5 input it is ~10x slower than a plain sum of shifted multiply-adds.

Implementations (`impl=`):

- 'xla': XLA's grouped conv, the reference.
- 'shift': the output as a sum of k*k shifted multiply-adds on the padded input, with a
  hand-written `jax.custom_vjp` backward so autodiff never saves the k*k shifted copies: the input
  gradient is the same shifted sum with the spatially flipped kernel (mirrored padding), and the
  weight gradient is a per-tap reduction computed over the batch in chunks inside `lax.scan` so the
  working set stays cache-sized. Only x and the kernel are kept as residuals.
- 'auto': chosen per backend, see `_AUTO`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("xla", "shift")

# impl='auto' by jax.default_backend().
# CPU timings (AMD EPYC, 2 cores, jax 0.10.2, 128x16x16x256 f32, k=5), median of 5, measured with
#   python benchmarks/depthwise.py --shape 128 16 16 256 --k 5 --repeats 5
#   xla:   fwd 466 ms, fwd+bwd 2127 ms
#   shift: fwd  40 ms, fwd+bwd  200 ms
_AUTO = {
    "cpu": "shift",
    # Auto on accelerators uses XLA's conv until measured otherwise.
    "gpu": "xla",
    "tpu": "xla",
}

# Images per step of the weight-gradient scan: keeps the per-step working set cache-sized.
_WGRAD_CHUNK = 16


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Accumulation dtype for the k*k tap sum: float32 for half-precision inputs."""
    if dtype in (jnp.bfloat16, jnp.float16):
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def _pads(k: int) -> tuple[int, int]:
    """XLA 'SAME' padding for stride 1: (k-1)//2 before, k//2 after."""
    return (k - 1) // 2, k // 2


def _xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    c = x.shape[-1]
    acc = _acc_dtype(x.dtype)
    out = lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        preferred_element_type=acc if acc != x.dtype else None,
    )
    return out.astype(x.dtype)


def _shifted_sum(x: jax.Array, w: jax.Array, pads: tuple[int, int]) -> jax.Array:
    """sum_{i,j} pad(x)[:, i:i+H, j:j+W, :] * w[i, j]; w is (k, k, C), pads (lo, hi) per axis."""
    n, h, wd, c = x.shape
    k = w.shape[0]
    acc = _acc_dtype(x.dtype)
    xp = jnp.pad(x, ((0, 0), pads, pads, (0, 0))) if k > 1 else x
    w = w.astype(x.dtype)
    out = None
    for i in range(k):
        for j in range(k):
            term = (xp[:, i : i + h, j : j + wd, :] * w[i, j]).astype(acc)
            out = term if out is None else out + term
    return out.astype(x.dtype)


def _weight_grad(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
    """dw[i, j, c] = sum_{n,h,w} pad(x)[n, h+i, w+j, c] * g[n, h, w, c], chunked over the batch."""
    n, h, wd, c = x.shape
    acc = _acc_dtype(x.dtype)
    lo, hi = _pads(k)

    def taps(xc: jax.Array, gc: jax.Array) -> jax.Array:
        xp = jnp.pad(xc, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
        gc = gc.astype(acc)
        rows = []
        for i in range(k):
            for j in range(k):
                s = xp[:, i : i + h, j : j + wd, :].astype(acc)
                rows.append(jnp.sum(s * gc, axis=(0, 1, 2)))
        return jnp.stack(rows).reshape(k, k, c)

    chunk = min(_WGRAD_CHUNK, n)
    steps, rest = divmod(n, chunk)
    total = jnp.zeros((k, k, c), acc)
    if steps > 1:
        main = steps * chunk
        xs = x[:main].reshape(steps, chunk, h, wd, c)
        gs = g[:main].reshape(steps, chunk, h, wd, c)

        def body(carry, xg):
            return carry + taps(*xg), None

        total, _ = lax.scan(body, total, (xs, gs))
    elif steps == 1:
        total = taps(x[:chunk], g[:chunk])
    if rest:
        total = total + taps(x[steps * chunk :], g[steps * chunk :])
    return total


@jax.custom_vjp
def _shift(x: jax.Array, kernel: jax.Array) -> jax.Array:
    k = kernel.shape[0]
    # The barrier keeps XLA from fusing the k*k-tap sum into a consumer reduction (a loss, BN's
    # statistics): on CPU that fusion materialises the shifted copies and runs several times slower.
    return lax.optimization_barrier(_shifted_sum(x, kernel[:, :, 0, :], _pads(k)))


def _shift_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _shift(x, kernel), (x, kernel)


def _shift_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    k = kernel.shape[0]
    lo, hi = _pads(k)
    g = g.astype(x.dtype)
    # Input gradient: correlation of g with the flipped kernel, padding mirrored (hi before).
    dx = _shifted_sum(g, kernel[::-1, ::-1, 0, :], (hi, lo))
    dx = lax.optimization_barrier(dx)
    dw = _weight_grad(x, g, k)
    return dx, dw[:, :, None, :].astype(kernel.dtype)


_shift.defvjp(_shift_fwd, _shift_bwd)


def _check(x: jax.Array, kernel: jax.Array) -> None:
    k = kernel.shape[0]
    if x.ndim != 4 or kernel.shape != (k, k, 1, x.shape[-1]):
        raise ValueError(
            f"expected x NHWC and kernel (k, k, 1, C); got x {x.shape}, kernel {kernel.shape}"
        )


def resolve_impl(impl: str) -> str:
    """The concrete implementation `impl` names ('auto' resolved for the default backend)."""
    if impl == "auto":
        return _AUTO.get(jax.default_backend(), "xla")
    if impl not in IMPLS:
        raise ValueError(f"unknown depthwise impl {impl!r}; choose one of auto, {', '.join(IMPLS)}")
    return impl


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, impl: str = "auto") -> jax.Array:
    """Depthwise conv of NHWC `x` with a (k, k, 1, C) kernel: stride 1, XLA 'SAME' padding, no bias.

    Computes in x's dtype (float32 accumulation for bfloat16/float16) and returns x's dtype.
    """
    impl = resolve_impl(impl)
    _check(x, kernel)
    if impl == "xla":
        return _xla(x, kernel)
    return _shift(x, kernel)
