"""The depthwise convolution as a sum of k*k shifted multiply-adds, for CPUs without the kernels.

XLA's grouped convolution (`xla.depthwise_conv`) is a known slow path on CPU, and its backward
pass runs like a dense convolution (jax issues #13800, #23713). Here the output is one fusion of
k*k shifted products of the padded input over the whole batch, with a hand-written
`jax.custom_vjp` so autodiff never saves the k*k shifted copies (only x and the kernel are kept).
The input gradient is the same shifted sum of the cotangent with the flipped kernel (mirrored
padding for even k); the weight gradient, the expensive part, is accumulated over cache-sized
batch chunks in a scan. docs/performance.md has the timings behind these choices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from convmixer_jax.ops.xla import acc_dtype

# Per-step working set of the batch-chunked weight-gradient loop: cache-sized chunks beat one pass.
_WGRAD_CHUNK_BYTES = 1 << 20
# Channels from which the tap sum is split in two halves (each half at least 16 float32 lanes).
_SPLIT_MIN_CHANNELS = 32


def same_pads(k: int) -> tuple[int, int]:
    """XLA 'SAME' padding for stride 1: (k-1)//2 before, k//2 after."""
    return (k - 1) // 2, k // 2


def _chunk(x: jax.Array, budget: int) -> int:
    """Images per chunk so that one chunk (in float32) takes about `budget` bytes."""
    image_bytes = 4 * x.shape[1] * x.shape[2] * x.shape[3]
    return max(1, min(x.shape[0], budget // max(image_bytes, 1)))


def _chunk_start(step: jax.Array, chunk: int, n: int) -> jax.Array:
    """First image of chunk `step`; the last chunk is moved back to end at n (it may overlap)."""
    return jnp.minimum(step * chunk, n - chunk)


def _shifted_sum(x: jax.Array, w: jax.Array, pads: tuple[int, int]) -> jax.Array:
    """sum_{i,j} pad(x)[:, i:i+H, j:j+W, :] * w[i, j]; w is (k, k, C), pads (lo, hi) per axis."""
    _, h, wd, _ = x.shape
    k = w.shape[0]
    acc = acc_dtype(x.dtype)
    # Half-precision inputs are multiplied in float32 (exact for bf16 products, faster on CPU).
    xp = jnp.pad(x, ((0, 0), pads, pads, (0, 0))).astype(acc)
    w = w.astype(x.dtype).astype(acc)
    out = None
    for i in range(k):
        for j in range(k):
            term = xp[:, i : i + h, j : j + wd, :] * w[i, j]
            out = term if out is None else out + term
    return out.astype(x.dtype)


def _stored_shifted_sum(x: jax.Array, w: jax.Array, pads: tuple[int, int]) -> jax.Array:
    """`_shifted_sum` as two channel halves joined by a concatenate on the channel axis.

    XLA's CPU backend never fuses a concatenate on the minor axis, so the tap sum is computed
    once and stored. Left as one fusion, it is recomputed inside every consumer: in a training
    step four times per ConvMixer block, twice in single-threaded updates of the scan's saved
    activations. The forward pass under differentiation uses this; inference and the backward
    pass, whose tap sums have one consumer, skip the extra copy.
    """
    c = x.shape[-1]
    if c < _SPLIT_MIN_CHANNELS:
        return _shifted_sum(x, w, pads)
    half = c // 2
    parts = [
        _shifted_sum(x[..., :half], w[..., :half], pads),
        _shifted_sum(x[..., half:], w[..., half:], pads),
    ]
    return jnp.concatenate(parts, axis=-1)


def _weight_grad_chunk(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
    """dw[i, j, c] = sum_{n,h,w} pad(x)[n, h+i, w+j, c] * g[n, h, w, c] for one chunk of images.

    For each column shift j one shifted copy of the chunk is materialised; each row tap i is then
    one fused elementwise sum over the H rows, reduced over images and columns. On XLA's CPU
    backend that beats k*k reductions over shifted slices (each slice is materialised first) and
    one fusion over the stacked shifts (docs/performance.md).
    """
    _, h, wd, _ = x.shape
    acc = acc_dtype(x.dtype)
    lo, hi = same_pads(k)
    xp = jnp.pad(x.astype(acc), ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    g = g.astype(acc)
    columns = []
    for j in range(k):
        shifted = xp[:, :, j : j + wd, :]
        taps = []
        for i in range(k):
            total = None
            for r in range(h):
                term = shifted[:, r + i] * g[:, r]
                total = term if total is None else total + term
            taps.append(total.sum(axis=(0, 1)))
        columns.append(jnp.stack(taps))
    return jnp.stack(columns, axis=1)


def _weight_grad(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
    """dw[i, j, c] = sum_{n,h,w} pad(x)[n, h+i, w+j, c] * g[n, h, w, c], over batch chunks."""
    n, c = x.shape[0], x.shape[-1]
    acc = acc_dtype(x.dtype)
    chunk = _chunk(x, _WGRAD_CHUNK_BYTES)
    steps = -(-n // chunk)

    def body(total: jax.Array, step: jax.Array) -> tuple[jax.Array, None]:
        start = _chunk_start(step, chunk, n)
        xc = lax.dynamic_slice_in_dim(x, start, chunk)
        gc = lax.dynamic_slice_in_dim(g, start, chunk)
        # Images the (moved-back) last chunk shares with the previous one are counted once.
        fresh = start + jnp.arange(chunk) >= step * chunk
        gc = jnp.where(fresh[:, None, None, None], gc, jnp.zeros((), gc.dtype))
        return total + _weight_grad_chunk(xc, gc, k), None

    total, _ = lax.scan(body, jnp.zeros((k, k, c), acc), jnp.arange(steps))
    return total


@jax.custom_vjp
def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise conv of NHWC `x` with a (k, k, 1, C) kernel, 'SAME' padding, in x's dtype
    (float32 accumulation for half precision)."""
    return _shifted_sum(x, kernel[:, :, 0, :], same_pads(kernel.shape[0]))


def _shift_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _stored_shifted_sum(x, kernel[:, :, 0, :], same_pads(kernel.shape[0])), (x, kernel)


def _shift_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    k = kernel.shape[0]
    lo, hi = same_pads(k)
    g = g.astype(x.dtype)
    # Input gradient: the same shifted sum of g with the flipped kernel and mirrored padding.
    dx = _shifted_sum(g, kernel[::-1, ::-1, 0, :], (hi, lo))
    dw = _weight_grad(x, g, k)
    return dx, dw[:, :, None, :].astype(kernel.dtype)


depthwise_conv.defvjp(_shift_fwd, _shift_bwd)
