"""Smoke test for scripts/bench_mesh.py: a 5-node mesh, one capacity change."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest
from meshtools import load_script

if TYPE_CHECKING:
    from types import ModuleType


def _load() -> ModuleType:
    return load_script("bench_mesh")


def test_percentile() -> None:
    mod = _load()
    assert mod.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert mod.percentile([1.0, 2.0], 1.0) == 2.0
    assert math.isnan(mod.percentile([], 0.5))


@pytest.mark.slow
def test_bench_mesh_five_nodes() -> None:
    mod = _load()
    figs = {f["figure"]: f for f in mod.bench_mesh((5,), runs=1, changes=1, idle_s=3.0)}
    for name in ("form_s", "all_ready_s", "prop_p50_ms", "prop_p99_ms", "idle_cpu_pct_median",
                 "idle_cpu_pct_max", "rss_mib_median", "rss_mib_max", "wall_s"):
        f = figs[f"mesh5_{name}"]
        assert isinstance(f["value"], float), f
        assert f["min"] <= f["value"] <= f["max"], f
    assert 0 < figs["mesh5_all_ready_s"]["value"] <= figs["mesh5_form_s"]["value"] < 45
    # four other nodes heard the one change, each exactly once and soon
    assert figs["mesh5_prop_p50_ms"]["samples"] == [4]
    assert figs["mesh5_prop_missing"]["value"] == 0
    assert 0 < figs["mesh5_prop_p50_ms"]["value"] <= figs["mesh5_prop_p99_ms"]["value"] < 5000
    assert 0 <= figs["mesh5_idle_cpu_pct_median"]["value"] < 100
    assert 30 < figs["mesh5_rss_mib_median"]["value"] < 1024
    assert figs["mesh_total_wall_s"]["value"] < 60
