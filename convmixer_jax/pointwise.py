"""The matrix product over channels of ConvMixer's pointwise (1x1) convs.

Implementations (`impl=`):

- 'xla': `jnp.einsum`, XLA's dot (on CPU it calls its own matmul library).
- 'native': the blocked float32 matmul kernel of `csrc/matmul_cpu.cc` (an XLA FFI custom call,
  built on first use by `native.py`) for the product and, through a `jax.custom_vjp`, both
  gradients (g @ w^T and x^T @ g). Other dtypes are cast to float32 around it. XLA's remat
  policies do not see a custom call as a dot, so it does not go with remat='dots'.
- 'auto': 'native' for float32 on a single CPU device where the kernels build (the custom call is
  not split by XLA's SPMD partitioner, so on a sharded batch every device would run all of it);
  'xla' everywhere else.

ConvMixer-768/32's pointwise product (8192 x 768 @ 768 x 768, float32, jax 0.10.2, 2-core AMD
EPYC VM; median of 5, two rounds; the VM's timings move 10-20% from run to run):
`python benchmarks/pointwise.py`
  product  x @ w     native 63-76 ms, xla 87-98 ms
  d/dx     g @ w^T   native 63-68 ms, xla 85-98 ms
Weight gradient x^T @ g on a 2-core AMD EPYC VM with AVX-512 (`python benchmarks/pointwise.py
[--rows 32768 --channels 256]`): 51.0/57.6 ms native against 50.1/50.1 ms xla here, and for
ConvMixer-256/8's 32768 x 256 rows 25.1/42.5/27.1 against 32.2/32.8/32.3 ms (42.5: a slow spell
of the VM; in a timing loop alternating the two, 24.3-25.1 against 32.1-32.3 ms).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from convmixer_jax import native

IMPLS = ("xla", "native")


def _native_product(a: jax.Array, b: jax.Array, *, transpose_a=False, transpose_b=False):
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    return native.call(
        native.MATMUL, (m, n), a, b, transpose_a=transpose_a, transpose_b=transpose_b
    )


@jax.custom_vjp
def _native(x: jax.Array, w: jax.Array) -> jax.Array:
    return _native_product(x, w)


def _native_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _native_product(x, w), (x, w)


def _native_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    dx = _native_product(g, w, transpose_b=True)
    dw = _native_product(x, g, transpose_a=True)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_native.defvjp(_native_fwd, _native_bwd)


def resolve_impl(impl: str, dtype: jnp.dtype) -> str:
    """The concrete implementation `impl` names for inputs of `dtype` on the default backend."""
    if impl == "auto":
        return "native" if jnp.dtype(dtype) == jnp.float32 and native.usable() else "xla"
    if impl not in IMPLS:
        raise ValueError(f"unknown pointwise impl {impl!r}; choose one of auto, {', '.join(IMPLS)}")
    if impl == "native":
        native.check_backend("pointwise")
    return impl


def pointwise(x: jax.Array, w: jax.Array, *, impl: str = "auto") -> jax.Array:
    """x (..., C) @ w (C, D) -> (..., D) in x's dtype."""
    impl = resolve_impl(impl, x.dtype)
    if impl == "xla":
        return jnp.einsum("...c,cd->...d", x, w.astype(x.dtype))
    flat = x.reshape(-1, x.shape[-1])
    out = _native(flat, w.astype(x.dtype))
    return out.reshape(*x.shape[:-1], w.shape[-1]).astype(x.dtype)
