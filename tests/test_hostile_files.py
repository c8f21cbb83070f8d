"""A member serving a file made of repeated blocks (issue 15, item 6), on real daemons.

A dag-pb node may link the same child again and again: four levels of 174 links over one
256 KiB leaf take five blocks (~30 KiB) and claim 256 KiB x 174^4 = 218 TiB. The member
(A) holds those blocks in its store and serves them over Bitswap like any file; the victim
(B) must refuse the claim by name, keep its memory flat, and keep serving honest files.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import httpx
import pytest
import trio
from meshtools import Daemon, init_home, mesh, run_cli, wait_until
from teammesh.node.files.kubo import open_kubo
from teammesh.node.p2p.host import Stream, open_host
from teammesh.protocols import bitswap as bs
from teammesh.storage.blockstore import FsBlockstore
from teammesh.storage.cid import RAW, Cid
from teammesh.storage.unixfs import (
    CHUNK_SIZE,
    DEFAULT_MAX_FILE_BYTES,
    FileImporter,
    FileTooLarge,
)
from test_cid import repeated_dag
from test_kubo import JSIPFS_BIN, JsIpfs
from test_kubo import jsipfs as jsipfs  # the js-ipfs daemon fixture, by name

pytestmark = pytest.mark.hostile

MiB = 1024 * 1024
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
RSS_GROWTH_LIMIT = 256 * MiB  # the victim's peak RSS may grow this much, not by the claim


def plant(d: Daemon, blocks: list[tuple[Cid, bytes]]) -> None:
    """Put blocks in a running daemon's store, as a member may (it serves what it holds)."""
    store = FsBlockstore(d.home / "store")
    for cid, data in blocks:
        store.put(cid, data)


def peak_rss(d: Daemon) -> int:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def test_a_repeated_block_file_claiming_214_tib_is_refused(tmp_path: Path,
                                                           scenario_report) -> None:
    root, claimed, blocks = repeated_dag(4)
    assert claimed > 200 * 1024**4  # the claim the issue reports
    tried = lost = 0
    with mesh(tmp_path, 2, slots=[0, 1]) as (a, b):
        wait_until(lambda: len(b.peers()) == 1, 20, what="the mesh")
        plant(a, blocks)
        before = peak_rss(b)

        # files get: refused at the root block, with the limit named; nothing written
        out = tmp_path / "huge.bin"
        for _ in range(3):
            tried += 1
            proc = run_cli(b.home, "get", str(root), "-o", str(out), check=False, timeout=120)
            refused = (proc.returncode == 1 and "limit" in proc.stderr
                       and str(DEFAULT_MAX_FILE_BYTES) in proc.stderr)
            lost += not refused
            assert refused, proc.stderr
            assert not out.exists()
            assert not out.with_name(out.name + ".partial").exists()
        # nothing of the claim was kept: the root is refused before any child is wanted
        assert not any(p["cid"] == str(root) for p in b.cli("files", "list")["files"])

        # a task whose input is that file fails with a reason, on the executor
        from teammesh.client import Client

        with Client.from_home(a.home, timeout=120) as c:
            tried += 1
            t = c.submit("hash.sha256", input_cid=str(root), wait=True, no_cache=True)
            failed = t["state"] == "failed" and "limit" in (t["error"] or "")
            lost += not failed
            assert failed, t

        assert a.alive()
        assert b.alive()
        grown = peak_rss(b) - before
        assert grown < RSS_GROWTH_LIMIT, f"B's peak RSS grew by {grown / MiB:.0f} MiB"

        # honest traffic still flows: a real file from A arrives intact at B
        honest = tmp_path / "honest.bin"
        honest.write_bytes(os.urandom(3 * CHUNK_SIZE + 7))
        cid = a.cli("share", str(honest))["cid"]
        got = b.cli("get", cid, "-o", str(tmp_path / "honest.out"))
        assert got["source"] == "peers"
        assert (tmp_path / "honest.out").read_bytes() == honest.read_bytes()
    scenario_report("files: repeated-block DAG claiming 218 TiB", tried=tried, lost=lost,
                    note=f"peak RSS +{grown / MiB:.0f} MiB")


# -- external IPFS: the network's files are anyone's ----------------------------------------


def block_put(node: JsIpfs, cid: Cid, data: bytes) -> None:
    """Store one block in js-ipfs under the codec of ``cid`` (bypassing the code under test)."""
    codec = "raw" if cid.codec == RAW else "dag-pb"
    r = httpx.post(f"{node.api_url}/api/v0/block/put",
                   params={"format": codec, "mhtype": "sha2-256", "version": "1"},
                   files={"file": ("block", data)}, timeout=30.0)
    r.raise_for_status()
    assert Cid.parse(r.json()["Key"]) == cid.to_v1()


@pytest.mark.skipif(not JSIPFS_BIN.exists(), reason="js-ipfs is not installed: scripts/setup-jsipfs")
async def test_an_external_ipfs_file_of_repeated_blocks_is_cut_off_at_the_limit(
        jsipfs: JsIpfs, tmp_path: Path, scenario_report) -> None:
    # two levels (7.4 GiB): js-ipfs itself stalls before sending a byte of deeper claims
    root, claimed, blocks = repeated_dag(2)
    for cid, data in blocks:
        block_put(jsipfs, cid, data)
    dest = tmp_path / "huge.bin"
    limit = 4 * MiB
    tracemalloc.start()
    try:
        async with open_kubo(jsipfs.api) as kubo:
            with pytest.raises(FileTooLarge, match=f"limit for one file \\({limit} bytes\\)"):
                await kubo.cat_to(root, dest, max_bytes=limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not dest.exists()
    assert not dest.with_name("huge.bin.partial").exists()
    assert peak < 64 * MiB
    scenario_report("files: external IPFS streaming a 7.4 GiB repeated file", tried=1, lost=0,
                    note=f"claim {claimed} bytes, cut at {limit}")


# -- Bitswap serving: one message must not load the store into memory -----------------------


def leaf_cids(path: Path) -> list[Cid]:
    """The raw leaves of ``path`` as ``ipfs add --cid-version=1`` cuts it."""
    imp = FileImporter()
    out: list[Cid] = []
    with path.open("rb") as f:
        while piece := f.read(4 * MiB):
            out += [c for c, _ in imp.feed(piece) if c.codec == RAW]
    out += [c for c, _ in imp.finish()[1] if c.codec == RAW]
    return out


async def test_one_wantlist_naming_every_block_keeps_the_server_small(
        tmp_path: Path, scenario_report) -> None:
    size = 128 * MiB
    with mesh(tmp_path, 1) as (a,):
        member = init_home(tmp_path / "member")
        run_cli(member, "join", run_cli(a.home, "team", "invite").stdout.strip())
        seed = (member / "identity.key").read_bytes()
        f = tmp_path / "big.bin"
        f.write_bytes(os.urandom(size))  # setup, before any trio task runs
        a.cli("share", str(f), timeout=300)
        cids = leaf_cids(f)
        wanted = {c.to_bytes() for c in cids}
        before = peak_rss(a)

        got: set[bytes] = set()
        all_in = trio.Event()

        async def receive(stream: Stream) -> None:  # A answers on streams it opens to us
            decoder = bs.FrameDecoder()
            while chunk := await stream.read():
                for raw in decoder.feed(chunk):
                    for cid, _ in bs.readdress(bs.decode(raw))[0]:
                        got.add(cid)
                if wanted <= got:
                    all_in.set()

        async with open_host(seed, [LOOPBACK], peer_gate=lambda p: True,
                             stream_gate=lambda p, proto: proto in bs.BITSWAP_PROTOCOLS,
                             gossip=False) as host:
            for proto in bs.BITSWAP_PROTOCOLS:
                host.set_handler(proto, receive)
            await host.connect(a.addr)
            stream = await host.open_stream(a.peer_id, bs.BITSWAP_PROTOCOLS[0])
            # one 50 KB message wanting all 512 blocks (128 MiB) at once
            await stream.write(bs.frame(bs.Message(wantlist=tuple(
                bs.Entry(c.to_bytes(), 1, False, bs.WantType.BLOCK, False) for c in cids),
                full=True)))
            with trio.fail_after(240):
                await all_in.wait()
            await stream.close()
        grown = peak_rss(a) - before
        assert a.alive()
    assert grown < 64 * MiB, f"A's peak RSS grew by {grown / MiB:.0f} MiB serving one message"
    scenario_report("bitswap: one wantlist for a 128 MiB file", tried=1, lost=0,
                    note=f"server peak RSS +{grown / MiB:.0f} MiB")
