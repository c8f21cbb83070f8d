"""The R2 mirror (teammesh.storage.r2) and its upload queue (teammesh.storage.mirrorqueue)
against real S3 servers on loopback: moto and SeaweedFS (tests/s3server.py).

Objects written by the mirror are read back with a plain boto3 client, as any S3 tool
would; downloads through the mirror must refuse an object that does not hash to its key.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from mypy_boto3_s3 import S3Client
from s3server import S3Endpoint, free_ports, moto_server, seaweedfs_server
from teammesh.storage.mirrorqueue import BACKOFF_BASE_S, MirrorQueue, drain
from teammesh.storage.r2 import (
    MirrorAuthError,
    MirrorCorrupt,
    MirrorError,
    MirrorUnavailable,
    R2Mirror,
)
from teammesh.storage.unixfs import cid_of_file

MIB = 1024 * 1024


def write_random(path: Path, size: int, seed: int = 0) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


@pytest.fixture(scope="module")
def moto() -> Iterator[S3Endpoint]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def seaweedfs() -> Iterator[S3Endpoint]:
    with seaweedfs_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["moto", "seaweedfs"])
def server(request: pytest.FixtureRequest) -> S3Endpoint:
    endpoint: S3Endpoint = request.getfixturevalue(request.param)
    return endpoint


@pytest.fixture
def mirror(server: S3Endpoint, request: pytest.FixtureRequest) -> R2Mirror:
    """A mirror on a fresh bucket named after the test."""
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
    m = R2Mirror(
        server.url, f"t-{digest}", server.access_key, server.secret_key, region=server.region
    )
    assert m.ensure_bucket()
    assert not m.ensure_bucket()
    return m


def plain_client(ep: S3Endpoint) -> S3Client:
    """A standard S3 client, as a user's own tools would have."""
    return boto3.client(
        "s3",
        endpoint_url=ep.url,
        aws_access_key_id=ep.access_key,
        aws_secret_access_key=ep.secret_key,
        config=Config(region_name=ep.region, s3={"addressing_style": "path"}),
    )


def test_upload_then_read_with_any_s3_client(
    server: S3Endpoint, mirror: R2Mirror, tmp_path: Path
) -> None:
    big = write_random(tmp_path / "big", 20 * MIB + 123, seed=1)
    small = write_random(tmp_path / "small", 1000, seed=2)
    cids = {p: cid_of_file(p) for p in (big, small)}
    sent: list[int] = []
    for p, cid in cids.items():
        assert not mirror.exists(cid)
        assert mirror.upload_file(cid, p, progress=sent.append)
        assert mirror.exists(cid)
        assert not mirror.upload_file(cid, p)  # same size already there: skipped
    assert sum(sent) == 20 * MIB + 123 + 1000
    assert sorted(mirror.list(), key=lambda x: x[1]) == [
        (cids[small], 1000),
        (cids[big], 20 * MIB + 123),
    ]

    s3 = plain_client(server)
    for p, cid in cids.items():
        obj = s3.get_object(Bucket=mirror.bucket, Key=f"ipfs/{cid}")
        assert obj["Body"].read() == p.read_bytes()
    etag = s3.head_object(Bucket=mirror.bucket, Key=f"ipfs/{cids[big]}")["ETag"]
    assert etag.strip('"').endswith("-3")  # 8 + 8 + 4 MiB parts

    for p, cid in cids.items():
        dest = tmp_path / f"{p.name}.down"
        assert mirror.download(cid, dest) == p.stat().st_size
        assert dest.read_bytes() == p.read_bytes()
        assert not dest.with_name(dest.name + ".partial").exists()


def test_download_refuses_a_tampered_object(
    server: S3Endpoint, mirror: R2Mirror, tmp_path: Path
) -> None:
    src = write_random(tmp_path / "src", 600_000)
    cid = cid_of_file(src)
    mirror.upload_file(cid, src)
    plain_client(server).put_object(
        Bucket=mirror.bucket, Key=mirror.key(cid), Body=b"something else" * 1000
    )
    dest = tmp_path / "out"
    with pytest.raises(MirrorCorrupt, match=str(cid)):
        mirror.download(cid, dest)
    assert not dest.exists()
    assert not (tmp_path / "out.partial").exists()
    # A missing object is an error too, and leaves nothing behind.
    other = cid_of_file(write_random(tmp_path / "other", 10, seed=9))
    with pytest.raises(MirrorError):
        mirror.download(other, dest)
    assert not dest.exists()
    assert not (tmp_path / "out.partial").exists()


def test_seaweedfs_checks_the_signature(seaweedfs: S3Endpoint, tmp_path: Path) -> None:
    ep = seaweedfs
    good = R2Mirror(ep.url, "signed", ep.access_key, ep.secret_key)
    good.ensure_bucket()
    bad = R2Mirror(ep.url, "signed", ep.access_key, "not-the-secret")
    src = write_random(tmp_path / "f", 100)
    with pytest.raises(MirrorAuthError, match="rejected our credentials"):
        bad.upload_file(cid_of_file(src), src)
    with pytest.raises(MirrorAuthError):
        bad.list()
    assert good.list() == []


def test_unreachable_endpoint_fails_fast(tmp_path: Path) -> None:
    (port,) = free_ports(1)  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    m = R2Mirror(url, "b", "k", "s")
    src = write_random(tmp_path / "f", 100)
    cid = cid_of_file(src)
    for call in (
        lambda: m.exists(cid),
        lambda: m.upload_file(cid, src),
        lambda: m.download(cid, tmp_path / "out"),
        m.ensure_bucket,
    ):
        # how fast is a benchmark's question; here: it fails, names the server, one line
        with pytest.raises(MirrorUnavailable, match=f"127.0.0.1:{port}") as info:
            call()
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out.partial").exists()


def test_queue_survives_a_down_mirror_and_catches_up(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    m = R2Mirror(f"http://127.0.0.1:{port}", "queued", "k", "s")
    files = [write_random(tmp_path / f"f{i}", 1000 * (i + 1), seed=i) for i in range(3)]
    cids = [cid_of_file(p) for p in files]
    db = tmp_path / "queue.db"
    with MirrorQueue(db) as q:
        for cid, p in zip(cids, files, strict=True):
            q.enqueue(cid, p)
        q.enqueue(cid_of_file(files[0]), files[0])  # twice: still one entry
        assert len(q) == 3
        assert len(q.due(0.0)) == 3

        report = drain(q, m, now=0.0)  # down: the round stops at the first failure
        assert report.unavailable
        assert report.failed == 1
        assert report.uploaded == 0
        first = q.pending()
        backed_off = [i for i in first if i.attempts == 1]
        assert len(backed_off) == 1
        assert backed_off[0].next_at == BACKOFF_BASE_S
        assert "unreachable" in (backed_off[0].last_error or "")
        # The same entry fails again later and waits twice as long.
        assert q.failed(backed_off[0].cid, "still down", now=BACKOFF_BASE_S) == 3 * BACKOFF_BASE_S

    # Nothing is lost across a restart of the node.
    with MirrorQueue(db) as q, seaweedfs_server(s3_port=port) as ep:
        m = R2Mirror(ep.url, "queued", ep.access_key, ep.secret_key)
        m.ensure_bucket()
        assert len(q) == 3
        now = 10 * BACKOFF_BASE_S
        for _ in range(5):  # the node's loop, bounded
            drain(q, m, now)
            if not q.pending():
                break
            now += BACKOFF_BASE_S
        assert q.pending() == []
        assert {cid for cid, _ in m.list()} == set(cids)
