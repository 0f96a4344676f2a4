"""Build and register the CPU kernels in `csrc/`: depthwise convolution, matrix product and
train-mode activation + BatchNorm.

The kernels are XLA FFI handlers. They are compiled on first use with the system C++ compiler
(`$CXX`, else `c++`) against the FFI headers shipped with jaxlib, with `-march=native`, into a
cache folder (`$CONVMIXER_JAX_CACHE`, else `~/.cache/convmixer_jax`) keyed by the source, the
jaxlib version, the compiler flags and this CPU's feature flags, so a shared home on different
hosts never loads a library built for another CPU. `available()` says whether that worked;
`load()` raises with the compiler's message if it did not. The build goes to a temporary file
renamed into place, so processes building at once never load a half-written library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.ffi
import jax.numpy as jnp
import numpy as np

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "depthwise_cpu.cc", CSRC / "matmul_cpu.cc", CSRC / "actnorm_cpu.cc")
HEADERS = (CSRC / "common.h",)
FORWARD = "convmixer_depthwise_forward"
WEIGHT_GRAD = "convmixer_depthwise_weight_grad"
MATMUL = "convmixer_matmul"
DEPTHWISE_LAYER = "convmixer_depthwise_residual_act_affine"
POINTWISE_LAYER = "convmixer_matmul_bias_act_affine"
ACTNORM_FORWARD = "convmixer_act_batch_norm_forward"
ACTNORM_BACKWARD = "convmixer_act_batch_norm_backward"
# The kernels' activations, by their `act` code (csrc/common.h's Act): 0, 1, 2.
ACTIVATIONS = ("identity", "relu", "gelu")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("CONVMIXER_JAX_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "convmixer_jax"


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        key.update(path.read_bytes())
    key.update(importlib.metadata.version("jaxlib").encode())
    key.update(compiler.encode())
    key.update(" ".join(_FLAGS).encode())
    key.update(_cpu_flags().encode())
    key.update(platform.machine().encode())
    return _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        first = next((line for line in lines if "error" in line), lines[0])
        raise RuntimeError(
            f"building the CPU kernels failed ({' '.join(cmd)}): {first}; "
            "install a C++17 compiler or set model.depthwise_impl='shift' and "
            "model.pointwise_impl='xla'"
        )
    os.replace(tmp, target)


def build() -> Path:
    """The compiled library for this machine, compiled first if the cache does not hold it."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"no C++ compiler {compiler!r} for the CPU kernels; install one (or set CXX) "
            "or set model.depthwise_impl='shift' and model.pointwise_impl='xla'"
        )
    path = _library_path(compiler)
    if not path.exists():
        _compile(compiler, path)
    return path


@functools.cache
def load() -> None:
    """Build (once per cache key) and register the kernels with XLA's CPU backend."""
    lib = ctypes.cdll.LoadLibrary(str(build()))
    jax.ffi.register_ffi_target(FORWARD, jax.ffi.pycapsule(lib.DepthwiseForward), platform="cpu")
    jax.ffi.register_ffi_target(
        WEIGHT_GRAD, jax.ffi.pycapsule(lib.DepthwiseWeightGrad), platform="cpu"
    )
    jax.ffi.register_ffi_target(MATMUL, jax.ffi.pycapsule(lib.Matmul), platform="cpu")
    jax.ffi.register_ffi_target(
        DEPTHWISE_LAYER, jax.ffi.pycapsule(lib.DepthwiseResidualActAffine), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        POINTWISE_LAYER, jax.ffi.pycapsule(lib.MatmulBiasActAffine), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        ACTNORM_FORWARD, jax.ffi.pycapsule(lib.ActNormForward), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        ACTNORM_BACKWARD, jax.ffi.pycapsule(lib.ActNormBackward), platform="cpu"
    )


def act_code(activation: str) -> np.int64:
    """The kernels' `act` attribute for `activation`."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"the CPU kernels take activation {', '.join(ACTIVATIONS)}; not {activation!r}"
        )
    return np.int64(ACTIVATIONS.index(activation))


@functools.cache
def available() -> bool:
    """Whether the kernels built and registered on this machine."""
    try:
        load()
    except (RuntimeError, OSError) as err:
        logging.warning("CPU kernels unavailable; 'auto' uses the XLA implementations: %s", err)
        return False
    return True


def call(target: str, shape, *operands: jax.Array, **attrs):
    """Kernel `target` on the operands cast to float32: a float32 array of `shape`, or a tuple of
    them where `shape` is a list of shapes."""
    load()
    if isinstance(shape, list):
        out = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shape)
    else:
        out = jax.ShapeDtypeStruct(shape, jnp.float32)
    kernel = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    return kernel(*(x.astype(jnp.float32) for x in operands), **attrs)
