"""Issue 6 acceptance on real daemons: share/get, the R2 mirror on a real S3 server."""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aleph_cid
import boto3
import pytest
import trio
from meshtools import Daemon, init_home, mesh, run_cli, wait_until
from s3server import seaweedfs_server
from teammesh.node.files.service import parse_cid
from teammesh.protocols.errors import StorageError
from teammesh.storage.unixfs import cid_of_file

MiB = 1024 * 1024


def _random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n
    return path


def _r2_config(home: Path, endpoint: str, key: str, secret: str, bucket: str) -> None:
    cfg = home / "config.toml"
    cfg.write_text(cfg.read_text() + f'\n[r2]\nendpoint = "{endpoint}"\nbucket = "{bucket}"\n'
                   f'access_key_id = "{key}"\nsecret_access_key = "{secret}"\n')


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_share_prints_kubo_cid_and_get_is_atomic(tmp_path: Path) -> None:
    with mesh(tmp_path, 1) as (node,):
        f = _random_file(tmp_path / "data.bin", 3 * 262_144 + 5)
        shared = node.cli("share", str(f))
        # the CID Kubo prints for `ipfs add --cid-version 1` (raw leaves), computed by
        # aleph-cid (a port of Kubo's importer), not by our own importer
        kubo = aleph_cid.CidHasher.for_ipfs_v1_raw_leaves()
        kubo.update(f.read_bytes())
        assert shared["cid"] == str(kubo.finalize())
        out = tmp_path / "copy.bin"
        got = node.cli("get", shared["cid"], "-o", str(out))
        assert got["source"] == "local"
        assert _sha(out) == _sha(f)
        listed = node.cli("files", "list")
        assert any(x["cid"] == shared["cid"] for x in listed["files"])
        # a CID nobody has: clear error, no file under the final name
        missing = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
        proc = run_cli(node.home, "get", missing + "x", "-o", str(tmp_path / "nope"),
                       check=False)
        assert proc.returncode == 1
        assert "not a CID" in proc.stderr
        assert not (tmp_path / "nope").exists()
        proc = run_cli(node.home, "share", str(tmp_path / "absent.bin"), check=False)
        assert proc.returncode == 1
        assert "does not exist" in proc.stderr


def test_r2_mirror_catches_up_and_serves_when_owner_is_offline(tmp_path: Path) -> None:
    f = _random_file(tmp_path / "big.bin", 24 * 1024 * 1024)
    bucket = "teammesh-test"
    data_dir = tmp_path / "seaweed"
    with seaweedfs_server(data_dir=data_dir) as s3:
        endpoint, key, secret = s3.url, s3.access_key, s3.secret_key
    # the mirror is DOWN while A shares: the upload waits in the persistent queue
    home_a = init_home(tmp_path / "a")
    run_cli(home_a, "team", "create", "t")
    _r2_config(home_a, endpoint, key, secret, bucket)
    a = Daemon(home_a).start()
    try:
        shared = a.cli("share", str(f), "--mirror")
        assert shared["mirror"] == "queued"
        wait_until(lambda: a.cli("files", "list")["store"]["mirror"] == "down", 30,
                   interval=0.5, what="the mirror to be reported down")
        assert a.cli("files", "list")["store"]["mirror_pending"] == 1
        assert a.alive()
        with seaweedfs_server(data_dir=data_dir, s3_port=int(endpoint.rsplit(":", 1)[1])):
            wait_until(lambda: a.cli("files", "list")["store"]["mirror_pending"] == 0, 60,
                       interval=0.5, what="the queued upload to reach the mirror")
            # a standard S3 client sees the object, byte-identical
            s3c = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key,
                               aws_secret_access_key=secret, region_name="us-east-1")
            keys = [o["Key"] for o in s3c.list_objects_v2(Bucket=bucket)["Contents"]]
            assert f"ipfs/{shared['cid']}" in keys
            body = s3c.get_object(Bucket=bucket, Key=f"ipfs/{shared['cid']}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == _sha(f)
            a.stop()
            # C never saw A: with A offline it gets the file from the mirror
            home_c = init_home(tmp_path / "c")
            run_cli(home_c, "team", "create", "other")  # any team: the mirror is by CID
            _r2_config(home_c, endpoint, key, secret, bucket)
            c = Daemon(home_c).start()
            try:
                out = tmp_path / "from-r2.bin"
                got = c.cli("get", shared["cid"], "-o", str(out), timeout=120)
                assert got["source"] == "r2"
                assert _sha(out) == _sha(f)
            finally:
                c.stop()
    finally:
        a.stop()


def test_r2_config_errors_are_clear(tmp_path: Path) -> None:
    home = init_home(tmp_path / "h")
    run_cli(home, "team", "create", "t")
    cfg = home / "config.toml"
    cfg.write_text(cfg.read_text() + '\n[r2]\nendpoint = "http://127.0.0.1:9"\n')
    proc = run_cli(home, "up", check=False, timeout=30)
    assert proc.returncode == 1
    assert "r2.bucket" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_node_to_node_fetch_200_mib_over_bitswap(tmp_path: Path) -> None:
    with mesh(tmp_path, 3) as (a, _b, c):
        wait_until(lambda: len(c.peers()) == 2, 20, what="the mesh")
        f = _random_file(tmp_path / "big.bin", 200 * 1024 * 1024)
        shared = a.cli("share", str(f), timeout=300)
        out = tmp_path / "fetched.bin"
        t0 = time.monotonic()
        got = c.cli("get", shared["cid"], "-o", str(out), timeout=600)
        elapsed = time.monotonic() - t0
        assert got["source"] == "peers"
        assert out.stat().st_size == f.stat().st_size
        assert _sha(out) == _sha(f)
        assert not out.with_name(out.name + ".partial").exists()
        print(f"200 MiB node to node: {200 / elapsed:.1f} MiB/s")


def test_get_into_a_full_store_fails_cleanly_and_the_node_keeps_serving(
        tmp_path: Path) -> None:
    """Blocks are written by the fetch's writer thread: its StoreFull must reach the user
    as one clear error, leave no output behind, and leave the daemon running."""
    with mesh(tmp_path, 2) as (a, b):
        wait_until(lambda: len(b.peers()) == 1, 20, what="the mesh")
        f = _random_file(tmp_path / "f.bin", 4 * 1024 * 1024)
        cid = a.cli("share", str(f))["cid"]
        b.stop()
        cfg = b.home / "config.toml"
        cfg.write_text(cfg.read_text() + "\n[files]\nlimit_mb = 1\n")
        b.start()
        wait_until(lambda: len(b.peers()) == 1, 30, interval=0.5, what="B to rejoin")
        out = tmp_path / "b.bin"
        proc = run_cli(b.home, "get", cid, "-o", str(out), check=False, timeout=120)
        assert proc.returncode == 1
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1, proc.stderr
        assert "is full" in err[0], proc.stderr
        assert not out.exists()
        assert not out.with_name(out.name + ".partial").exists()
        assert b.alive()
        # the daemon still serves: a small file fits and arrives intact
        small = _random_file(tmp_path / "small.bin", 100_000)
        small_cid = a.cli("share", str(small))["cid"]
        got = b.cli("get", small_cid, "-o", str(tmp_path / "small.out"))
        assert got["source"] == "peers"
        assert _sha(tmp_path / "small.out") == _sha(small)


def test_corrupt_block_in_a_peer_store_is_skipped(tmp_path: Path) -> None:
    with mesh(tmp_path, 3) as (a, b, c):
        wait_until(lambda: len(c.peers()) == 2, 20, what="the mesh")
        f = _random_file(tmp_path / "f.bin", 4 * 1024 * 1024)
        cid = a.cli("share", str(f))["cid"]
        b.cli("get", cid, "-o", str(tmp_path / "b.bin"))
        # corrupt every block B holds: whatever C asks B for comes back wrong
        for block in (b.home / "store" / "blocks").rglob("*"):
            if block.is_file():
                data = bytearray(block.read_bytes())
                data[len(data) // 2] ^= 0xFF
                block.write_bytes(bytes(data))
        # with the honest owner offline, C can only ask B, whose blocks are all damaged
        a.stop()
        wait_until(lambda: len(c.peers()) == 1, 30, interval=0.5, what="A to drop out")
        out = tmp_path / "c.bin"
        proc = run_cli(c.home, "get", cid, "-o", str(out), check=False, timeout=300)
        assert proc.returncode == 1
        assert not out.exists()
        assert not out.with_name(out.name + ".partial").exists()
        # B checks every block against its CID before serving it: the damage is caught
        # at the source (a peer that sends bad blocks anyway is covered in test_bitswap)
        assert b.cli("files", "list")["store"]["corrupt_local_blocks"] >= 1
        # the owner is back: the same command now gives the right bytes
        a.start()
        wait_until(lambda: len(c.peers()) == 2, 30, interval=0.5, what="A to come back")
        got = c.cli("get", cid, "-o", str(out), timeout=300)
        assert got["source"] == "peers"
        assert _sha(out) == _sha(f)


def test_tasks_read_and_write_files_across_the_mesh(tmp_path: Path) -> None:
    """The submitter shares inputs; the executor (another daemon) fetches them by CID over
    Bitswap, runs the kinds, and returns a large output by CID."""
    import base64

    import numpy as np

    from teammesh.client import Client

    with mesh(tmp_path, 2, slots=[0, 1]) as (a, b):
        wait_until(lambda: len(a.peers()) == 1, 20, what="the mesh")
        csv = tmp_path / "data.csv"
        rows = "\n".join(f"{i},{i * 2.5},{'x' if i % 3 else 'y'}" for i in range(50_000))
        csv.write_text("n,v,label\n" + rows + "\n")
        np.save(tmp_path / "a.npy", np.arange(6, dtype=float).reshape(2, 3))
        np.save(tmp_path / "b.npy", np.ones((3, 2)))
        cid_csv = a.cli("share", str(csv))["cid"]
        cid_a = a.cli("share", str(tmp_path / "a.npy"))["cid"]
        cid_b = a.cli("share", str(tmp_path / "b.npy"))["cid"]
        with Client.from_home(a.home, timeout=120) as c:
            s = c.submit("csv.summary", input_cid=cid_csv, wait=True)
            assert s["state"] == "done", s["error"]
            assert s["executed_by"] == b.peer_id
            assert s["output"]["rows"] == 50_000
            assert s["output"]["columns"]["v"]["max"] == 49_999 * 2.5
            m = c.submit("np.matmul", params={"a": {"$cid": cid_a}, "b": {"$cid": cid_b}},
                         wait=True)
            assert m["state"] == "done", m["error"]
            assert m["output"] == [[3.0, 3.0], [12.0, 12.0]]
            big = os.urandom(2 * 1024 * 1024)
            d = c.submit("base64.decode", base64.b64encode(big), wait=True, no_cache=True)
            assert d["state"] == "done", d["error"]
            ref = d["output"]
            assert set(ref) == {"$cid", "size"}
            assert ref["size"] == len(big)
        out = tmp_path / "decoded.bin"
        a.cli("get", ref["$cid"], "-o", str(out))
        assert out.read_bytes() == big


# --- the streaming task APIs, on a node in this process against a daemon ------------------

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@asynccontextmanager
async def in_process_node(home: Path, bootstrap: list[str]) -> AsyncIterator[Any]:
    """A whole node (membership, mesh, files with Bitswap) run inside the test's trio loop,
    so its FilesService methods can be called directly; stopped at the end of the block."""
    from teammesh.node.core.config import Home, load_config
    from teammesh.node.daemon import Node, UpOptions
    from teammesh.node.files.service import FilesService

    h = Home(home)
    node = Node(h, load_config(h), UpOptions(listen=[LOOPBACK], bootstrap=bootstrap,
                                              api="127.0.0.1:0"))
    node.files = FilesService(node.config, h.path, is_member=node.membership.is_member,
                              admit_peer=node.membership.bitswap_peers.add)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        try:
            yield node
        finally:
            node.stop_requested.set()


async def wait_connected(node: Any, peer: str) -> None:
    """Poll the host's connections (py-libp2p has no event for it), 30 s at most."""
    for _ in range(600):
        if peer in node.host.connected_peers():
            return
        await trio.sleep(0.05)
    raise AssertionError(f"{peer} did not connect within 30 s")


async def test_fetch_to_path_store_path_and_materialise_over_bitswap(tmp_path: Path) -> None:
    from teammesh.storage.unixfs import FileTooLarge

    with mesh(tmp_path, 1) as (a,):
        home_c = init_home(tmp_path / "c")
        run_cli(home_c, "join", run_cli(a.home, "team", "invite").stdout.strip())
        small = _random_file(tmp_path / "small.bin", 3 * MiB + 11)
        big = _random_file(tmp_path / "big.bin", 5 * MiB)
        cid_small = a.cli("share", str(small))["cid"]
        cid_big = a.cli("share", str(big))["cid"]
        async with in_process_node(home_c, [a.addr]) as c:
            await wait_connected(c, a.peer_id)
            files = c.files

            # fetched from A and written chunk by chunk
            dest = tmp_path / "small.out"
            assert await files.fetch_to_path(cid_small, dest, [a.peer_id], 4 * MiB) == \
                small.stat().st_size
            assert _sha(dest) == _sha(small)

            # over the caller's limit: refused at the root, nothing fetched or written
            dest_big = tmp_path / "big.out"
            with pytest.raises(FileTooLarge, match=f"limit for one file \\({4 * MiB} bytes"):
                await files.fetch_to_path(cid_big, dest_big, [a.peer_id], 4 * MiB)
            assert not dest_big.exists()
            assert not files.has_file(parse_cid(cid_big))
            # a file already here is held to the limit on the way out too
            with pytest.raises(FileTooLarge):
                await files.fetch_to_path(cid_small, tmp_path / "again", [], MiB)
            assert not (tmp_path / "again").exists()

            # materialise joins only small files in memory, and says what to do otherwise
            assert await files.materialise(cid_small, [a.peer_id]) == small.read_bytes()
            with pytest.raises(FileTooLarge, match="take the file by path"):
                await files.materialise(cid_small, [a.peer_id], max_bytes=MiB)

            # store_path: a file on disk enters the store pinned, read a piece at a time
            out = _random_file(tmp_path / "output.bin", 48 * MiB)
            tracemalloc.start()
            try:
                ref = await files.store_path(out)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert ref == {"$cid": str(cid_of_file(out)), "size": 48 * MiB}
            assert peak < 16 * MiB, f"store_path peaked at {peak / MiB:.0f} MiB"
            assert parse_cid(ref["$cid"]) in files.store.pins()
            with pytest.raises(StorageError, match="not a file"):
                await files.store_path(tmp_path / "absent.bin")
            # ... and the daemon fetches it from this node over Bitswap
            got_path = tmp_path / "from-c.bin"
            got = await trio.to_thread.run_sync(
                lambda: a.cli("get", ref["$cid"], "-o", str(got_path), timeout=300))
            assert got["source"] == "peers"
            assert _sha(got_path) == _sha(out)


def test_a_mirror_download_over_the_limit_leaves_nothing(tmp_path: Path) -> None:
    from s3server import moto_server
    from teammesh.storage.r2 import R2Mirror
    from teammesh.storage.unixfs import FileTooLarge

    f = _random_file(tmp_path / "f.bin", 3 * MiB)
    cid = cid_of_file(f)
    with moto_server() as ep:
        m = R2Mirror(ep.url, "limits", ep.access_key, ep.secret_key, region=ep.region)
        m.ensure_bucket()
        m.upload_file(cid, f)
        dest = tmp_path / "out.bin"
        with pytest.raises(FileTooLarge, match=f"limit for one file \\({2 * MiB} bytes"):
            m.download(cid, dest, max_bytes=2 * MiB)
        assert not dest.exists()
        assert not dest.with_name("out.bin.partial").exists()
        assert m.download(cid, dest, max_bytes=3 * MiB) == 3 * MiB
        assert _sha(dest) == _sha(f)
