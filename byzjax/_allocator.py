"""glibc malloc settings that keep XLA:CPU's large buffers mapped between calls.

XLA:CPU allocates every temporary and output buffer afresh on each call, and glibc
serves a request over 32 MB with a new `mmap`, so every call faults in its big
buffers page by page: an (25, 1e6) float32 intermediate took 24,900 minor page
faults and 68 ms per call, clipping + Krum at (25, 1e6) 177 ms against 11 ms for
Krum alone (measured with jax 0.10.2 on the 2-core AMD EPYC of docs/benchmarks.md).

`TUNABLES` keeps such buffers in one heap that is never given back (`mmap_max=0`,
`trim_threshold`, `arena_max=1`: a non-main arena cannot hold a block over 64 MB)
and backs it with transparent huge pages where the kernel allows them (`hugetlb=1`,
glibc >= 2.35; older versions ignore it): 4.8 faults and 22.5 ms per call for the
intermediate above, clipping + Krum 44 ms. The price is that the process keeps
its peak memory until it exits.

glibc reads `GLIBC_TUNABLES` once, at process start, so the command line and the
benchmark scripts restart themselves with it (`reexec_tuned`); library users set
it in their shell. `BYZJAX_MALLOC=0` turns the restart off.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLES = {
    "glibc.malloc.hugetlb": "1",
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 40),
}


def _parse(value: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in value.split(":") if "=" in item)


def tuned_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` with `TUNABLES` added to GLIBC_TUNABLES, or None to leave it be.

    None when every tunable is already there (the restarted process), when
    BYZJAX_MALLOC=0, or off glibc Linux. A tunable the user set keeps the user's
    value.
    """
    if environ.get("BYZJAX_MALLOC", "1") == "0":
        return None
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    current = _parse(environ.get("GLIBC_TUNABLES", ""))
    if all(key in current for key in TUNABLES):
        return None
    merged = {**TUNABLES, **current}
    return {
        **environ,
        "GLIBC_TUNABLES": ":".join(f"{k}={v}" for k, v in merged.items()),
    }


def reexec_tuned() -> None:
    """Restarts this Python process with `tuned_env`, if it changes anything.

    Call it first thing in a program's entry point, before work is done: the
    process image is replaced (same interpreter, same arguments, `sys.orig_argv`).
    """
    env = tuned_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
