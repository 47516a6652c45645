"""Test configuration: CPU only, float32 JAX, a bounded hypothesis profile."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import byzjax  # noqa: E402

settings.register_profile(
    "byzjax",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "byzjax"))


@pytest.fixture(params=["1", "0"], ids=["kernels", "xla"])
def kernels_or_xla(request, monkeypatch):
    """The test on the CPU kernels, then on the XLA forms, which GPUs and CPUs
    without a C++ compiler run (`BYZJAX_NATIVE`)."""
    monkeypatch.setenv("BYZJAX_NATIVE", request.param)
    if request.param == "1" and not byzjax._native.enabled():
        pytest.skip("no CPU kernels here")
    return request.param
