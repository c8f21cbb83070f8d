"""Smoke test for the Dask baseline in scripts/bench_baselines.py (task-throughput bench)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from meshtools import load_script

if TYPE_CHECKING:
    from types import ModuleType


def _load() -> ModuleType:
    return load_script("bench_baselines")


def test_percentile() -> None:
    mod = _load()
    assert mod.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert mod.percentile([1.0, 2.0], 99) == pytest.approx(1.99)


@pytest.mark.slow
def test_dask_baseline_tiny() -> None:
    pytest.importorskip("distributed")
    mod = _load()
    figs = mod.bench_dask(n_tasks=50, n_seq=10, runs=1, timeout=120)
    by_name = {f["figure"]: f for f in figs}
    for name in ("dask_tasks_per_s", "dask_p50_ms", "dask_p99_ms", "dask_start_s"):
        assert name in by_name, name
        fig = by_name[name]
        assert fig["value"] > 0
        assert len(fig["runs"]) == 1
        assert fig["min"] <= fig["value"] <= fig["max"]
    assert by_name["dask_p50_ms"]["value"] <= by_name["dask_p99_ms"]["value"]
