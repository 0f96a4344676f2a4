"""Time `depthwise_conv` forward and forward+backward for each implementation.

    python benchmarks/depthwise.py [--shape N H W C] [--k K] [--repeats R] [--dtype DTYPE]

Each function is jit-compiled and warmed up once (compile time excluded); the figure is the median
wall time of `--repeats` calls, each ending in `block_until_ready`. Prints a table, then one JSON
line with the same numbers.
Runs under `convmixer_jax.runtime.hostmem`'s malloc settings, as the package's commands do.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from convmixer_jax import ops  # noqa: E402
from convmixer_jax.benchmark import median_seconds  # noqa: E402
from convmixer_jax.ops.policy import DEPTHWISE as IMPLS  # noqa: E402
from convmixer_jax.runtime import hostmem  # noqa: E402


def _time(fn, *args, repeats: int) -> float:
    """Median seconds per call of a jitted fn after one warm-up call."""
    jax.block_until_ready(fn(*args))
    return median_seconds(lambda: fn(*args), 1, repeats)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=(128, 16, 16, 256), metavar="NHWC")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    args = parser.parse_args(argv)

    n, h, w, c = args.shape
    dtype = jnp.dtype(args.dtype)
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (n, h, w, c), dtype)
    kernel = jax.random.normal(kw, (args.k, args.k, 1, c), dtype)
    g = jax.random.normal(kg, (n, h, w, c), dtype)

    results = {}
    for impl in args.impls:
        fwd = jax.jit(lambda x, kernel, impl=impl: ops.depthwise_conv(x, kernel, impl))

        def fwd_bwd(x, kernel, g, impl=impl):
            # Output and both gradients for the cotangent g, as inside a network.
            y, vjp = jax.vjp(lambda x, kernel: ops.depthwise_conv(x, kernel, impl), x, kernel)
            return y, vjp(g)

        fwd_bwd = jax.jit(fwd_bwd)
        results[impl] = {
            "fwd_ms": 1e3 * _time(fwd, x, kernel, repeats=args.repeats),
            "fwd_bwd_ms": 1e3 * _time(fwd_bwd, x, kernel, g, repeats=args.repeats),
        }

    print(f"depthwise conv {n}x{h}x{w}x{c} k={args.k} {dtype.name} on {jax.default_backend()}")
    print(f"{'impl':<8}{'fwd ms':>10}{'fwd+bwd ms':>14}")
    for impl, r in results.items():
        print(f"{impl:<8}{r['fwd_ms']:>10.1f}{r['fwd_bwd_ms']:>14.1f}")
    record = {
        "shape": [n, h, w, c],
        "k": args.k,
        "dtype": dtype.name,
        "backend": jax.default_backend(),
        "repeats": args.repeats,
        "results": {i: {m: round(v, 2) for m, v in r.items()} for i, r in results.items()},
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    hostmem.reexec_tuned()
    main()
