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
