"""The entry points' malloc settings: which environment gets them, and their effect."""

import json
import os
import subprocess
import sys

import pytest

from convmixer_jax.runtime import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = ("glibc", "2.36")
ALL = ":".join(f"{k}={v}" for k, v in hostmem.TUNABLES.items())


def test_cpu_environment_gets_every_tunable():
    env = hostmem.tuned_environment({"JAX_PLATFORMS": "cpu", "HOME": "/h"}, GLIBC)
    assert env == {"JAX_PLATFORMS": "cpu", "HOME": "/h", "GLIBC_TUNABLES": ALL}
    assert "glibc.malloc.hugetlb=1" in ALL and "glibc.malloc.mmap_max=0" in ALL


def test_user_settings_are_kept_and_nothing_is_added_twice():
    user = {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.foo=1"}
    tunables = hostmem.tuned_environment(user, GLIBC)["GLIBC_TUNABLES"].split(":")
    assert tunables[:2] == ["glibc.malloc.arena_max=4", "glibc.foo=1"]
    assert sorted(tunables[2:]) == sorted(i for i in ALL.split(":") if "arena_max" not in i)
    # Once they are all there (as after the restart), there is nothing to do.
    assert hostmem.tuned_environment({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": ALL}, GLIBC) is None


@pytest.mark.parametrize(
    "environ, libc, applies",
    [
        ({"JAX_PLATFORMS": "cpu"}, ("glibc", "2.26"), True),
        ({"JAX_PLATFORMS": "cpu"}, ("glibc", "2.17"), False),  # tunables too old
        ({"JAX_PLATFORMS": "cpu"}, ("", ""), False),  # musl or unknown
        ({"JAX_PLATFORMS": "cuda,cpu"}, GLIBC, False),
        ({"JAX_PLATFORMS": "tpu"}, GLIBC, False),
        ({"JAX_PLATFORMS": "cpu", "CONVMIXER_MALLOC": "default"}, GLIBC, False),
        ({"JAX_PLATFORMS": "tpu", "CONVMIXER_MALLOC": "tuned"}, GLIBC, True),
    ],
)
def test_where_the_tunables_apply(environ, libc, applies):
    assert (hostmem.tuned_environment(environ, libc) is not None) == applies


def test_without_jax_platforms_an_accelerator_plugin_decides(monkeypatch):
    monkeypatch.setattr(hostmem, "_accelerator_plugin_installed", lambda: True)
    assert hostmem.tuned_environment({}, GLIBC) is None
    monkeypatch.setattr(hostmem, "_accelerator_plugin_installed", lambda: False)
    assert hostmem.tuned_environment({}, GLIBC)["GLIBC_TUNABLES"] == ALL


def test_bad_choice_names_the_valid_ones():
    with pytest.raises(ValueError, match="auto, tuned or default"):
        hostmem.wanted({"CONVMIXER_MALLOC": "fast"})


def test_mode(monkeypatch):
    for tunables, want in [(ALL, "tuned"), ("glibc.malloc.arena_max=2", "custom"), ("", "default")]:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
        assert hostmem.mode() == want


# The child restarts itself under the tunables, then writes a 256 MiB array, frees it and writes
# a new one, counting the page faults of the second write. NumPy's own huge-page advice is off,
# so its blocks come from malloc as XLA's do.
CHILD = """
import json, os, resource, sys
import numpy as np
from convmixer_jax.runtime import hostmem
hostmem.reexec_tuned()
n = 64 * 2**20
a = np.ones(n, np.float32); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(n, np.float32)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "mode": hostmem.mode(),
                  "tunables": os.environ.get("GLIBC_TUNABLES", ""), "faults": faults}))
"""


def _child(choice):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CONVMIXER_MALLOC": choice}
    env["NUMPY_MADVISE_HUGEPAGE"] = "0"
    env.pop("GLIBC_TUNABLES", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, "x", "--y=1"], cwd=ROOT, env=env, stdout=subprocess.PIPE
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    return proc.pid, json.loads(out.decode().strip().splitlines()[-1])


def test_restart_keeps_pid_and_arguments_and_reuses_freed_memory():
    pid, tuned = _child("auto")
    assert tuned["pid"] == pid and tuned["argv"] == ["x", "--y=1"]  # exec'd in place
    assert tuned["mode"] == "tuned" and tuned["tunables"] == ALL
    pages = 256 * 2**20 // 4096
    assert tuned["faults"] < pages // 100  # the freed block came back, already mapped
    pid, plain = _child("default")
    assert plain["pid"] == pid and plain["mode"] == "default" and plain["tunables"] == ""
    assert plain["faults"] > pages // 2  # a fresh mapping, faulted in page by page
