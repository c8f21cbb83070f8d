"""Smoke test for the Dask baseline in scripts/bench_baselines.py (task-throughput bench)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from types import ModuleType

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_baselines.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_baselines", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_baselines", mod)
    spec.loader.exec_module(mod)
    return mod


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
