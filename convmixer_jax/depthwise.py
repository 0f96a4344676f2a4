"""Depthwise k x k convolution (stride 1, 'SAME' padding) for ConvMixer's mixer blocks.

Every ConvMixer block starts with a large-kernel depthwise conv. The natural JAX spelling,
`lax.conv_general_dilated(..., feature_group_count=C)`, is a known slow path on CPU, and its
backward pass runs like a dense conv (jax issues #13800, #23713): on a 128x16x16x256 k=5 input it
is roughly 10x slower than a plain sum of shifted multiply-adds, forward and backward.

Implementations (`impl=`):

- 'xla': XLA's grouped conv, the reference.
- 'shift': the output as a sum of k*k shifted multiply-adds on the padded input, one fusion over
  the whole batch (so every core works on it; with a loop over batch chunks instead, the
  ConvMixer-256/8 CPU train step ran at 28.7-28.9 img/s against 33.5-34.4), with a hand-written
  `jax.custom_vjp` backward so autodiff never saves the k*k shifted copies (only x and the kernel
  are kept). Under differentiation the forward tap sum is stored once rather than recomputed by
  each of its consumers (`_stored_shifted_sum`). The input gradient is the same shifted sum of the
  cotangent with the spatially flipped kernel (mirrored padding for even k); the weight gradient,
  the expensive part, is accumulated over batch chunks in a scan (`_weight_grad_chunk`).
- 'native': hand-written CPU kernels (`csrc/depthwise_cpu.cc`, XLA FFI custom calls built on first
  use by `native.py`) for the forward pass, the input gradient (the forward kernel on the cotangent
  with the flipped kernel) and the weight gradient, each one pass over 32-channel tiles of one
  image in cache, on XLA's CPU thread pool; float32 inside (other dtypes are cast around it).
- 'auto': chosen per backend, see `_AUTO`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from convmixer_jax import native

IMPLS = ("xla", "shift", "native")

# impl='auto' by jax.default_backend(). CPU timings, float32, jax 0.10.2, 2-core AMD EPYC VM,
# median of 5, jit, warm-up excluded (fwd+bwd: output and both gradients):
#   python benchmarks/depthwise.py --shape 128 16 16 256 --k 5 --repeats 5
#   xla:    fwd 548 ms, fwd+bwd 6450 ms
#   shift:  fwd  68 ms, fwd+bwd  213 ms
#   native: fwd  33 ms, fwd+bwd   79 ms
#   python benchmarks/depthwise.py --shape 8 32 32 768 --k 7 --repeats 5 --impls shift native
#   shift:  fwd  74 ms, fwd+bwd  256 ms
#   native: fwd  27 ms, fwd+bwd   79 ms
# Under hostmem's malloc settings (the benchmark's default now), current kernels, --repeats 15,
# three runs: native fwd 9.3-10.9 ms, fwd+bwd 33-37 ms (k5); fwd 10.8-11.6, fwd+bwd 35-48 (k7).
# 'native' needs a C++ compiler and one device (see resolve_impl); 'shift' is the CPU fallback.
_AUTO = {
    "cpu": "native",
    # Auto on accelerators uses XLA's conv until measured otherwise.
    "gpu": "xla",
    "tpu": "xla",
}

# Per-step working set of the batch-chunked weight-gradient loop: cache-sized chunks beat one pass.
_WGRAD_CHUNK_BYTES = 1 << 20
# Channels from which the tap sum is split in two halves (each half at least 16 float32 lanes).
_SPLIT_MIN_CHANNELS = 32


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Accumulation dtype for the k*k tap sum: float32 for half-precision inputs."""
    if dtype in (jnp.bfloat16, jnp.float16):
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


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


def _xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    acc = _acc_dtype(x.dtype)
    out = lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
        preferred_element_type=acc if acc != x.dtype else None,
    )
    return out.astype(x.dtype)


def _shifted_sum(x: jax.Array, w: jax.Array, pads: tuple[int, int]) -> jax.Array:
    """sum_{i,j} pad(x)[:, i:i+H, j:j+W, :] * w[i, j]; w is (k, k, C), pads (lo, hi) per axis."""
    _, h, wd, _ = x.shape
    k = w.shape[0]
    acc = _acc_dtype(x.dtype)
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
    one fused elementwise sum over the H rows, reduced over images and columns. XLA's CPU backend
    runs this far faster than k*k reductions over shifted slices (it materialises every slice
    before reducing it) and faster than stacking the k column shifts and summing all k row taps
    in one fusion, as this did before: `python benchmarks/depthwise.py --shape 8 32 32 768 --k 7
    --impls shift` fwd+bwd 172-189 ms against 249-266, `--shape 128 16 16 256 --k 5` 130-134
    against 163-167 (alternated runs, with `_stored_shifted_sum` in both new figures).
    """
    _, h, wd, _ = x.shape
    acc = _acc_dtype(x.dtype)
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
    acc = _acc_dtype(x.dtype)
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
def _shift(x: jax.Array, kernel: jax.Array) -> jax.Array:
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


_shift.defvjp(_shift_fwd, _shift_bwd)


def _native_forward(x: jax.Array, w: jax.Array, pad_lo: int) -> jax.Array:
    return native.call(native.FORWARD, x.shape, x, w, pad_lo=np.int64(pad_lo))


def _native_weight_grad(x: jax.Array, g: jax.Array, k: int, pad_lo: int) -> jax.Array:
    return native.call(native.WEIGHT_GRAD, (k, k, x.shape[-1]), x, g, pad_lo=np.int64(pad_lo))


@jax.custom_vjp
def _native(x: jax.Array, kernel: jax.Array) -> jax.Array:
    k = kernel.shape[0]
    w = kernel[:, :, 0, :].astype(x.dtype)
    return _native_forward(x, w, same_pads(k)[0]).astype(x.dtype)


def _native_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _native(x, kernel), (x, kernel)


def _native_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    k = kernel.shape[0]
    lo, hi = same_pads(k)
    g = g.astype(x.dtype)
    dx = _native_forward(g, kernel[::-1, ::-1, 0, :].astype(x.dtype), hi).astype(x.dtype)
    dw = _native_weight_grad(x, g, k, lo)
    return dx, dw[:, :, None, :].astype(kernel.dtype)


_native.defvjp(_native_fwd, _native_bwd)


def _check(x: jax.Array, kernel: jax.Array) -> None:
    k = kernel.shape[0]
    if x.ndim != 4 or kernel.shape != (k, k, 1, x.shape[-1]):
        raise ValueError(
            f"expected x NHWC and kernel (k, k, 1, C); got x {x.shape}, kernel {kernel.shape}"
        )


def auto_impl(platform: str) -> str:
    """What 'auto' picks on `platform` ('cpu', 'gpu'/'cuda', 'tpu') where the kernels are usable."""
    return _AUTO.get("gpu" if platform == "cuda" else platform, "xla")


def resolve_impl(impl: str) -> str:
    """The concrete implementation `impl` names ('auto' resolved for the default backend).

    On CPU 'auto' falls back to 'shift' where the native kernels are not usable (`native.usable`:
    more than one device, or no compiler).
    """
    if impl == "auto":
        choice = auto_impl(jax.default_backend())
        if choice == "native" and not native.usable():
            return "shift"
        return choice
    if impl not in IMPLS:
        raise ValueError(f"unknown depthwise impl {impl!r}; choose one of auto, {', '.join(IMPLS)}")
    if impl == "native":
        native.check_backend("depthwise")
    return impl


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, impl: str = "auto") -> jax.Array:
    """Depthwise conv of NHWC `x` with a (k, k, 1, C) kernel: stride 1, XLA 'SAME' padding, no bias.

    Computes in x's dtype (float32 accumulation for bfloat16/float16) and returns x's dtype.
    """
    impl = resolve_impl(impl)
    _check(x, kernel)
    if impl == "xla":
        return _xla(x, kernel)
    if impl == "native":
        return _native(x, kernel)
    return _shift(x, kernel)
