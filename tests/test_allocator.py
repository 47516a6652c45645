"""The malloc settings the command line restarts with (byzjax/_allocator.py)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from byzjax import _allocator

GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC_LINUX, reason="glibc Linux only")


def _parsed(env):
    return dict(item.split("=", 1) for item in env["GLIBC_TUNABLES"].split(":"))


@needs_glibc
def test_tuned_env_adds_every_tunable_and_keeps_the_rest_of_environ():
    env = _allocator.tuned_env({"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert _parsed(env) == _allocator.TUNABLES


@needs_glibc
def test_tuned_env_keeps_the_users_own_tunables():
    user = "glibc.malloc.arena_max=4:glibc.pthread.rseq=0"
    tunables = _parsed(_allocator.tuned_env({"GLIBC_TUNABLES": user}))
    assert tunables["glibc.malloc.arena_max"] == "4"
    assert tunables["glibc.pthread.rseq"] == "0"
    assert tunables["glibc.malloc.mmap_max"] == "0"


def test_tuned_env_is_none_when_done_opted_out_or_not_glibc(monkeypatch):
    done = ":".join(f"{k}={v}" for k, v in _allocator.TUNABLES.items())
    assert _allocator.tuned_env({"GLIBC_TUNABLES": done}) is None
    assert _allocator.tuned_env({"BYZJAX_MALLOC": "0"}) is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _allocator.tuned_env({}) is None


# Runs a jitted function whose (16, 1e6) float32 intermediate is materialised,
# after restarting through `reexec_tuned` unless told not to, and prints the
# minor page faults per call.
_FAULTS = """
import resource, sys
from byzjax._allocator import reexec_tuned
if sys.argv[1] == "tuned":
    reexec_tuned()
import jax, jax.numpy as jnp
x = jnp.ones((16, 10**6), jnp.float32)
ones = jnp.ones(16, jnp.float32)
g = jax.jit(lambda o, x: o @ jax.lax.optimization_barrier(x * 2.0))
jax.block_until_ready(g(ones, x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    jax.block_until_ready(g(ones, x))
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def _faults_per_call(mode):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode],
        check=True,
        capture_output=True,
        text=True,
        env={**env, "BYZJAX_MALLOC": "1"},
        timeout=120,
    )
    return float(out.stdout.split()[-1])


@needs_glibc
def test_restart_keeps_large_buffers_mapped_between_calls():
    # 64 MB per call: glibc's default maps it afresh (~15,600 4 KB faults); the
    # restarted process reuses its heap.
    plain, tuned = _faults_per_call("plain"), _faults_per_call("tuned")
    assert plain > 10_000
    assert tuned < plain / 20


def test_readme_export_line_is_the_tunables():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = ":".join(f"{k}={v}" for k, v in _allocator.TUNABLES.items())
    assert f"export GLIBC_TUNABLES={line}\n" in readme
