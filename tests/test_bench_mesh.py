"""Smoke test for scripts/bench_mesh.py: a 5-node mesh, one capacity change.

It checks the bench runs and its output is well formed, and that the run lost nothing;
wall time and latency percentiles are the bench's to record (scripts/bench), not a
test's to bound.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

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


def check_figures(figs: dict[str, dict[str, Any]], n: int, changes: int, runs: int) -> None:
    """The bench's output is well formed and the run lost nothing. No wall-clock or
    resource bounds: how fast and how big are for scripts/bench to record, not for a test
    on a loaded machine to judge."""
    p = f"mesh{n}_"
    for name in ("form_s", "nodes_full_at_end", "form_flaps", "all_ready_s",
                 "start_to_ready_p50_s", "prop_p50_ms", "prop_p99_ms", "prop_max_ms",
                 "prop_missing", "prop_seq_mismatch", "idle_cpu_pct_median",
                 "idle_cpu_pct_max", "rss_mib_median", "rss_mib_max", "setup_s", "wall_s"):
        f = figs[p + name]
        assert {"figure", "value", "unit", "runs", "min", "max"} <= set(f), f
        assert isinstance(f["value"], float), f
        assert math.isfinite(f["value"]), f
        assert len(f["runs"]) == runs, f
        assert f["min"] <= f["value"] <= f["max"], f
    # the mesh formed: every node listed every other, and no node dropped one meanwhile
    assert figs[p + "nodes_full_at_end"]["value"] == n
    # every other node heard each capacity change once, with the seq that was sent
    assert figs[p + "prop_p50_ms"]["samples"] == [(n - 1) * changes] * runs
    assert figs[p + "prop_missing"]["value"] == 0
    assert figs[p + "prop_seq_mismatch"]["value"] == 0
    # orderings that hold by construction, not by speed
    assert 0 < figs[p + "all_ready_s"]["value"] <= figs[p + "form_s"]["value"]
    assert 0 < figs[p + "prop_p50_ms"]["value"] <= figs[p + "prop_p99_ms"]["value"] \
        <= figs[p + "prop_max_ms"]["value"]
    assert figs[p + "idle_cpu_pct_median"]["value"] >= 0
    assert 0 < figs[p + "rss_mib_median"]["value"] <= figs[p + "rss_mib_max"]["value"]
    assert figs["mesh_total_wall_s"]["value"] > 0


def test_check_figures_catches_a_lost_change() -> None:
    mod = _load()
    run = {"form_s": 3.0, "nodes_full": 5, "form_flaps": 0, "all_ready_s": 2.0,
           "start_to_ready_s": [1.0] * 5, "lat_ms": [5.0, 6.0, 7.0, 8.0], "rtt_ms": [1.0],
           "missing": 0, "seq_mismatch": 0, "cpu_pct": [1.0] * 5, "rss_mib": [80.0] * 5,
           "child_rss_mib": [0.0], "setup_s": 4.0, "wall_s": 9.0}
    total = {"figure": "mesh_total_wall_s", "value": 9.0, "unit": "s", "runs": [9.0],
             "min": 9.0, "max": 9.0}

    def figs(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {f["figure"]: f for f in [*mod.summarise(5, [r]), total]}

    check_figures(figs(run), 5, 1, 1)
    lost = {**run, "lat_ms": [5.0, 6.0, 7.0], "missing": 1}
    with pytest.raises(AssertionError):
        check_figures(figs(lost), 5, 1, 1)


@pytest.mark.slow
def test_bench_mesh_five_nodes() -> None:
    mod = _load()
    figs = {f["figure"]: f for f in mod.bench_mesh((5,), runs=1, changes=1, idle_s=3.0)}
    check_figures(figs, 5, changes=1, runs=1)
