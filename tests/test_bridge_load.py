"""A bounded bridge load run (scripts/bench_bridge.py): 200 signed submits, 64 in flight,
mixing portable and queued kinds, against `teammesh bridge dev` with several task shards.
Every answer must be right (portable outputs equal the Python kind's, cache hits equal the
first answer, queued tasks come back from the lease with their input and params and take
their results); no timing is asserted (`scripts/bench bridge` measures that).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_bridge  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (ROOT / "bridge" / "node_modules" / "wrangler").is_dir(),
    reason="bridge/node_modules is missing: run `bash bridge/run-tests.sh` or `npm ci` in bridge/",
)


def test_signed_load_has_no_errors_and_every_result_is_right(tmp_path: Path) -> None:
    fig = trio.run(lambda: bench_bridge.run_against_dev(
        4, n=200, concurrency=64, peers=8, state_dir=tmp_path, check_drain=True))
    assert fig["errors"] == 0, fig.get("first_errors")
    assert fig["submits"] == 200
    # the mix: a quarter of each kind, some repeats of portable ones
    assert set(fig["by_kind"]) == {"hash.sha256", "text.stats", "np.matmul", "bench.queued"}
    assert sum(fig["by_kind"].values()) == 200
    assert fig["queued"] == fig["by_kind"]["np.matmul"] + fig["by_kind"]["bench.queued"]
    # repeats are answered from the result cache (checked against the first answer)
    assert fig["repeats"] >= 5
    assert 1 <= fig["cache_hits"] <= fig["repeats"]
    assert fig["drain_problems"] == []
