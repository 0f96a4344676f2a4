"""Host memory: glibc malloc settings that the command-line entry points run under on CPU.

XLA's CPU backend allocates one temporary buffer per execution of a compiled function (gigabytes
for a ConvMixer-768/32 train step), and glibc serves blocks that large with a fresh mmap and
returns them with munmap, so every step touched all of those pages anew (docs/performance.md
has the page faults and the time it cost). Under the glibc tunables below,
freed memory stays in one arena for reuse (no mmap, no trimming) and sits on transparent huge
pages, and the faults are gone. A process can only set tunables before it starts, so
`reexec_tuned` restarts the current command (same arguments, same pid) with them in its
environment, before anything else has run.

They apply where JAX runs on the CPU (JAX_PLATFORMS starts with 'cpu', or no GPU or TPU plugin is
installed); on accelerator hosts device memory has its own allocator and the input pipeline's many
threads are better served by glibc's per-thread arenas. CONVMIXER_MALLOC=tuned applies them
anyway, CONVMIXER_MALLOC=default never.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

ENV_VAR = "CONVMIXER_MALLOC"
TUNABLES = {
    "glibc.malloc.hugetlb": "1",  # madvise(MADV_HUGEPAGE) on what malloc maps (glibc >= 2.35)
    "glibc.malloc.mmap_max": "0",  # no block gets its own mapping ...
    "glibc.malloc.trim_threshold": str(2**62),  # ... and freed memory is never handed back
    "glibc.malloc.arena_max": "1",  # one arena, so a block freed by one thread serves any other
}
_ACCELERATOR_PLUGINS = ("libtpu", "jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm")


def _accelerator_plugin_installed() -> bool:
    names = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
    return any(name.lower().startswith(_ACCELERATOR_PLUGINS) for name in names)


def wanted(environ) -> bool:
    """Whether the tunables should apply to a process with this environment."""
    choice = environ.get(ENV_VAR, "auto")
    if choice not in ("auto", "tuned", "default"):
        raise ValueError(f"{ENV_VAR}={choice!r}; set it to auto, tuned or default")
    if choice != "auto":
        return choice == "tuned"
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not _accelerator_plugin_installed()


def tuned_environment(environ, libc: tuple[str, str]) -> dict | None:
    """`environ` with TUNABLES added to GLIBC_TUNABLES, or None where there is nothing to add:
    not glibc (`libc` is platform.libc_ver()), not wanted, or each of them already set (a
    setting of the user's is kept)."""
    name, version = libc
    if name != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 26) or not wanted(environ):
        return None
    current = [item for item in environ.get("GLIBC_TUNABLES", "").split(":") if item]
    present = {item.split("=")[0] for item in current}
    added = [f"{key}={value}" for key, value in TUNABLES.items() if key not in present]
    if not added:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(current + added)}


def reexec_tuned() -> None:
    """Restarts this command with the tunables set, where `tuned_environment` has any to add.
    Call it first thing under `if __name__ == "__main__"`."""
    if sys.platform != "linux":
        return
    env = tuned_environment(os.environ, platform.libc_ver())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)


def mode() -> str:
    """'tuned' where this process runs with all the tunables, 'custom' where GLIBC_TUNABLES sets
    other malloc settings, else 'default'."""
    items = set(os.environ.get("GLIBC_TUNABLES", "").split(":"))
    if all(f"{key}={value}" in items for key, value in TUNABLES.items()):
        return "tuned"
    return "custom" if any(item.startswith("glibc.malloc.") for item in items) else "default"
