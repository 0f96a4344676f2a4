"""Time the pointwise-conv matrix product and its two gradients for each implementation.

    python benchmarks/pointwise.py [--rows M] [--channels C] [--repeats R] [--rounds N]

The product x @ w (x: M x C, w: C x C) and the gradients g @ w^T and x^T @ g, each jit-compiled
on its own and warmed up once (compile time excluded). The figure is the median wall time of
`--repeats` calls, each blocked on; the implementations alternate for `--rounds` rounds, so a
slow spell of the machine shows in every implementation's figures. Prints a table, then one JSON
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
from convmixer_jax.ops.policy import POINTWISE as IMPLS  # noqa: E402
from convmixer_jax.runtime import hostmem  # noqa: E402


def _products(impl: str) -> dict:
    """name -> jitted fn(x, w, g): the product and, through jax.vjp, each gradient alone."""

    def grads(x, w, g):
        return jax.vjp(lambda x, w: ops.pointwise_conv(x, w[None, None], impl), x, w)[1](g)

    return {
        "product": jax.jit(lambda x, w, g: ops.pointwise_conv(x, w[None, None], impl)),
        "dx": jax.jit(lambda x, w, g: grads(x, w, g)[0]),
        "dw": jax.jit(lambda x, w, g: grads(x, w, g)[1]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192, help="M: images x pixels")
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    args = parser.parse_args(argv)

    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (args.rows, args.channels), jnp.float32)
    w = jax.random.normal(kw, (args.channels, args.channels), jnp.float32)
    g = jax.random.normal(kg, (args.rows, args.channels), jnp.float32)
    fns = {impl: _products(impl) for impl in args.impls}
    results = {impl: {name: [] for name in fns[impl]} for impl in args.impls}
    for _ in range(args.rounds):
        for impl, named in fns.items():
            for name, fn in named.items():
                jax.block_until_ready(fn(x, w, g))  # compile and warm up
                seconds = median_seconds(lambda fn=fn: fn(x, w, g), 1, args.repeats)
                results[impl][name].append(round(1e3 * seconds, 2))

    print(f"pointwise product {args.rows}x{args.channels} @ {args.channels}x{args.channels}")
    print(f"float32 on {jax.default_backend()}, ms per call, one figure per round")
    print(f"{'impl':<8}" + "".join(f"{name:>18}" for name in ("product", "dx", "dw")))
    for impl, r in results.items():
        cells = ["/".join(f"{v:.1f}" for v in r[name]) for name in ("product", "dx", "dw")]
        print(f"{impl:<8}" + "".join(f"{cell:>18}" for cell in cells))
    record = {
        "rows": args.rows,
        "channels": args.channels,
        "backend": jax.default_backend(),
        "repeats": args.repeats,
        "results_ms": results,
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    hostmem.reexec_tuned()
    main()
