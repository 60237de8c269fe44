"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.paths import shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (always there in CI); skip with a clear reason elsewhere."""
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data is absent (it is present in CI): real-data test skipped")
    return d


@pytest.fixture(scope="session")
def shared_cases() -> Path:
    """../shared/cases beside the checkout: small inputs that broke the product, each with its right behaviour."""
    d = shared_data_dir()
    cases = d.parent / "cases" if d is not None else None
    if cases is None or not cases.is_dir():
        pytest.skip("../shared/cases is absent (it is present in CI): regression case skipped")
    return cases


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (start-up costs seconds on 2 cores)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                 configure_logging=False)
    yield ray
    # left running: shut down at interpreter exit, so later tests can reuse it
