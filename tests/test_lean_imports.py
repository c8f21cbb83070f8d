"""A daemon loads only the py-libp2p parts it runs (node/core/lean_imports.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, sys
import teammesh.node.daemon
loaded = sorted({m.split('.')[0] for m in sys.modules} & {'aioquic', 'zeroconf'})
from libp2p.transport.quic.transport import QUICTransport
try:
    QUICTransport()
    called = "no error"
except Exception as exc:
    called = f"{type(exc).__name__}: {exc}"
print(json.dumps({"loaded": loaded, "called": called}))
"""


def _probe(env: dict[str, str] | None = None, first: str = "") -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", first + PROBE], capture_output=True, text=True,
                         check=True, env={**os.environ, **(env or {})})
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_a_daemon_skips_quic_and_mdns_and_a_skipped_part_fails_loudly_if_used() -> None:
    r = _probe()
    assert r["loaded"] == []
    assert "TEAMMESH_FULL_IMPORTS=1" in str(r["called"])


def test_full_imports_on_request_or_when_libp2p_came_first() -> None:
    for r in (_probe({"TEAMMESH_FULL_IMPORTS": "1"}), _probe(first="import libp2p\n")):
        assert r["loaded"] == ["aioquic", "zeroconf"]
        assert "TEAMMESH_FULL_IMPORTS" not in str(r["called"])  # the real class ran
