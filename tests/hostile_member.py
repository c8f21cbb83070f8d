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
    """Send every executor as many tasks as it could possibly queue (a flood): pipeline
    ``depth`` tasks per slot, whatever their length, from the first task on."""
    from teammesh.protocols import scheduler

    class _EveryKindIsShort(dict):  # type: ignore[type-arg]
        def get(self, key: object, default: object = None) -> object:
            return super().get(key, 0.001)  # a task time for kinds not run yet

    original = scheduler.Scheduler.__init__

    def init(self: scheduler.Scheduler, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        # the pipeline's depth is about target_queued_s of work, capped at max_pipeline
        self.config = dataclasses.replace(self.config, max_pipeline=depth,
                                          target_queued_s=3600.0)
        self._kind_avg_s = _EveryKindIsShort()

    scheduler.Scheduler.__init__ = init  # type: ignore[method-assign]


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
