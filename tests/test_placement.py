"""Placement inputs: GPUs in ads (nvidia-smi), and kinds' resources against members."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from meshtools import mesh, wait_until
from teammesh.node.core.gpu import detect_gpus, gpu_memory_mib
from teammesh.node.kinds import Resources
from teammesh.node.tasks.service import fits

A100 = "NVIDIA A100-SXM4-40GB, 40960"


def fake_nvidia_smi(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + body + "\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)


def test_gpus_are_what_nvidia_smi_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    fake_nvidia_smi(tmp_path / "bin", f'echo "{A100}"\necho "Tesla T4, 15360"')
    assert detect_gpus() == ("NVIDIA A100-SXM4-40GB, 40960 MiB", "Tesla T4, 15360 MiB")
    assert gpu_memory_mib(detect_gpus()[1]) == 15360
    fake_nvidia_smi(tmp_path / "bin", "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    assert detect_gpus() == ()
    fake_nvidia_smi(tmp_path / "bin", "sleep 30")
    assert detect_gpus(timeout_s=0.5) == ()


def test_no_nvidia_smi_means_no_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_gpus() == ()


def test_a_kind_fits_only_where_its_resources_are() -> None:
    gib = 1024**3
    assert fits(Resources(memory_mb=512), 1 * gib, ())
    assert not fits(Resources(memory_mb=4096), 1 * gib, ())
    assert not fits(Resources(gpu=True), 64 * gib, ())
    assert fits(Resources(gpu=True, memory_mb=1024), 64 * gib, ("Tesla T4, 15360 MiB",))
    assert fits(None, 0, ())  # a kind this node does not know: the member decides


def test_a_members_gpus_reach_the_team_in_its_ad(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    fake_nvidia_smi(tmp_path / "bin", f'echo "{A100}"')
    with mesh(tmp_path, 2, slots=[0, 1]) as (a, b):
        peers = wait_until(lambda: a.peers(), 20, what="b's ad")
        assert peers[0]["peer_id"] == b.peer_id
        assert peers[0]["gpus"] == ["NVIDIA A100-SXM4-40GB, 40960 MiB"]


def test_a_kind_whose_member_dropped_off_waits_for_it(tmp_path: Path) -> None:
    """A laptop's network drops (here: its daemon is killed): tasks of the kinds only it
    ran wait, saying so, instead of failing as "no member runs kind"; they run when it is
    back (the machine's WaitReason.UNREACHABLE, kind_memory_s)."""
    from teammesh.client import Client

    with mesh(tmp_path, 2, slots=[0, 1]) as (a, b):
        wait_until(lambda: any(p["peer_id"] == b.peer_id for p in a.peers()), 30,
                   what="a to see b")
        with Client.from_home(a.home) as ca:
            first = ca.submit("base64.encode", b"x" * 300_000, wait=True, no_cache=True)
            assert first["executed_by"] == b.peer_id
            b_id = b.peer_id
            b.kill9()
            wait_until(lambda: all(p["peer_id"] != b_id for p in a.peers()), 30,
                       what="a to list b as gone")
            tid = ca.submit("base64.encode", b"y" * 300_000, no_cache=True)["id"]

            def waits() -> bool:
                t = ca.task(tid)
                assert t["state"] == "queued", t
                return "is reachable now (one was" in (t["waiting_reason"] or "")

            wait_until(waits, 30, what="the task to wait for the kind's member")
            b.start()
            done = ca.task(tid, wait=60)
            assert done["state"] == "done", done["error"]
            assert done["executed_by"] == b_id
