"""A member gone bad: the real daemon, patched (``python tests/hostile_member.py ARGS``).

``TEAMMESH_HOSTILE`` picks the misbehaviour: ``ad:cost=-1`` (its capability ads carry
that value; ``nan`` and huge numbers work too), ``pipeline:64`` (it queues 64 tasks per
slot on every executor, whatever their length: a flood), ``forge`` (as an executor, it
alters outputs after signing their digests and adds results for tasks it never got). Everything else is the project's
own code, so the attacker speaks the protocols exactly as a member does.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from teammesh.node.cli.main import main
from teammesh.node.p2p import mesh
from teammesh.protocols import capability


def _patch_ads(spec: str) -> None:
    field, _, raw = spec.partition("=")
    value: object = float(raw) if field == "cost" else int(float(raw))
    original = mesh.Mesh.own_ad

    def own_ad(self: mesh.Mesh, host: object) -> object:
        ad = original(self, host)  # type: ignore[arg-type]
        return dataclasses.replace(ad, **{{"free": "free_slots"}.get(field, field): value})

    mesh.Mesh.own_ad = own_ad  # type: ignore[method-assign,assignment]
    # gossipsub validates our own publications too: the attacker's checks must pass them
    capability._check_capacity = lambda ad: None  # type: ignore[attr-defined]


def _patch_pipeline(depth: int) -> None:
    """Send every executor as many tasks as it could possibly queue (a flood)."""
    from teammesh.protocols import scheduler

    scheduler.pipeline_depth = lambda *_args: depth  # type: ignore[assignment]


def _patch_forge() -> None:
    """As an executor: alter every output after its digest was taken (the submitter must
    notice) and add a well-formed result for a task nobody gave us (it must be ignored)."""
    from teammesh.protocols import tasks as tp

    original = tp.seal_results

    def seal_results(identity: object, submitter: str, results: list[tp.TaskResult]) -> bytes:
        forged = [dataclasses.replace(r, output="forged") for r in results]
        forged.append(tp.make_result("0" * 23, True, "not yours", None, 1.0, 1.0))
        return original(identity, submitter, forged)  # type: ignore[arg-type]

    tp.seal_results = seal_results  # type: ignore[assignment]


if __name__ == "__main__":
    mode = os.environ.get("TEAMMESH_HOSTILE", "")
    if mode.startswith("ad:"):
        _patch_ads(mode[3:])
    elif mode == "forge":
        _patch_forge()
    elif mode.startswith("pipeline:"):
        _patch_pipeline(int(mode.split(":")[1]))
    sys.argv[0] = "teammesh"
    main()
