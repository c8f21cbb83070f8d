"""Behaviours of storage/ that survived a mutation pass (scripts/mutation, docs/TESTING.md).

Each test's docstring names the mutant it was written against.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from teammesh.protocols.errors import MirrorError, MirrorUnavailable, StorageError
from teammesh.storage.blockstore import CorruptBlock, FsBlockstore, StoreFull
from teammesh.storage.cid import BLAKE2B_256, RAW, SHA2_512, Cid
from teammesh.storage.dagpb import decode_node, decode_unixfs, encode_node
from teammesh.storage.mirrorqueue import MirrorQueue, drain
from teammesh.storage.r2 import MirrorAuthError, R2Mirror
from teammesh.storage.unixfs import FileImporter, FileTooLarge, cid_of_file, human_bytes

# multihash codes as varints (the multicodec table): blake2b-256 is 0xb220
BLAKE2B_256_VARINT = b"\xa0\xe4\x02"


@pytest.mark.parametrize("block", [b"", b"hello", b"x" * 5000])
def test_cids_with_other_hash_functions_verify_their_blocks(block: bytes) -> None:
    """Cid.verify: `actual = None`; _digest: blake2b without digest_size=32 (a 64-byte
    blake2b cut to 32 bytes is a different hash). The digests come from hashlib here."""
    assert BLAKE2B_256 == 0xB220
    blake = Cid(1, RAW, BLAKE2B_256_VARINT + b"\x20"
                + hashlib.blake2b(block, digest_size=32).digest())
    sha512 = Cid(1, RAW, bytes([SHA2_512, 64]) + hashlib.sha512(block).digest())
    for cid in (blake, sha512):
        assert cid.verify(block)
        assert not cid.verify(block + b"!")


def block_path(store: FsBlockstore, cid: Cid) -> Path:
    name = str(cid.to_v1())
    return store.root / "blocks" / name[-3:-1] / name


def test_every_corrupt_block_is_counted_and_refusals_name_the_cid(tmp_path: Path) -> None:
    """_discard_corrupt: `corrupt_blocks = 1`; put: CorruptBlock(None)."""
    store = FsBlockstore(tmp_path)
    for n in (1, 2):
        data = bytes([n]) * 100
        cid = Cid.of_block(RAW, data)
        store.put(cid, data)
        block_path(store, cid).write_bytes(b"rot" * 10)
        with pytest.raises(CorruptBlock):
            store.get(cid)
        assert store.corrupt_blocks == n
    cid = Cid.of_block(RAW, b"good")
    with pytest.raises(CorruptBlock, match=f"^refusing block {cid}: its bytes do not match"):
        store.put(cid, b"evil")
    assert not store.has(cid)


def test_unixfs_skips_fixed_width_fields_it_does_not_know() -> None:
    """dagpb._skip: a fixed32 skipped as 8 bytes (no test reached the fixed-width branch)."""
    known = bytes.fromhex("0802" "18e807")  # Type = 2 (file), filesize = 1000
    fixed32 = b"\x4d" + b"\x01\x02\x03\x04"  # field 9, wire type 5
    fixed64 = b"\x51" + b"\x00" * 8  # field 10, wire type 1
    for unknown in (fixed32, fixed64):
        got = decode_unixfs(unknown + known)
        assert (got.type, got.filesize) == (2, 1000)
    with pytest.raises(StorageError, match="truncated fixed-size"):
        decode_unixfs(known + b"\x4d\x01\x02")


def _raw_cid_bytes(block: bytes) -> bytes:
    """A CIDv1 written out from the multiformats spec: version 1, codec raw (0x55),
    multihash sha2-256 (0x12) of length 32 (0x20)."""
    return b"\x01\x55\x12\x20" + hashlib.sha256(block).digest()


def test_cid_strings_in_every_documented_multibase_name_the_same_block() -> None:
    """Cid.parse: `prefix in "ff"` (an upper-case base16 CID, multibase 'F', refused)."""
    raw = _raw_cid_bytes(b"hello")
    b32 = "b" + base64.b32encode(raw).decode().lower().rstrip("=")
    want = Cid.parse(b32)
    assert want.verify(b"hello")
    for text in ("B" + b32[1:].upper(), "f" + raw.hex(), "F" + raw.hex().upper(),
                 "u" + base64.urlsafe_b64encode(raw).decode().rstrip("=")):
        assert Cid.parse(text) == want, text


def test_cid_refusals_tell_the_user_what_is_expected() -> None:
    """Cid.parse: the unknown-prefix message set to None or changed; Cid.__post_init__:
    the CIDv0 message changed."""
    with pytest.raises(StorageError, match=(
            r"^unknown multibase prefix 'x' in CID 'xyz'; expected 'b' \(base32\) "
            r"or a 'Qm\.\.\.' CIDv0$")):
        Cid.parse("xyz")
    with pytest.raises(StorageError, match=(
            r"^a CIDv0 must be a dag-pb block named by a 32-byte sha2-256 hash$")):
        Cid(0, RAW, b"\x12\x20" + hashlib.sha256(b"x").digest())


def test_a_put_that_fits_exactly_after_gc_is_accepted(tmp_path: Path) -> None:
    """FsBlockstore.ensure_room: `_used + n >= limit_bytes` after gc (a fetch of exactly
    the room left was refused as "full")."""
    store = FsBlockstore(tmp_path, limit_bytes=1000)
    junk = b"j" * 600
    cid = Cid.of_block(RAW, junk)
    store.put(cid, junk)  # not pinned: gc may take it
    old = block_path(store, cid)
    os.utime(old, (1_000_000, 1_000_000))  # written long before gc starts
    store.ensure_room(1000)  # 600 + 1000 > 1000: gc frees 600, then 0 + 1000 fits
    assert not store.has(cid)
    with pytest.raises(StoreFull):
        store.ensure_room(1001)


def test_gc_logs_what_it_freed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """FsBlockstore.gc: `logger.info(freed, self.root)` (a logging error instead of the
    line an operator reads)."""
    store = FsBlockstore(tmp_path)
    data = b"g" * 321
    cid = Cid.of_block(RAW, data)
    store.put(cid, data)
    os.utime(block_path(store, cid), (1_000_000, 1_000_000))
    with caplog.at_level(logging.INFO, logger="teammesh.storage.blockstore"):
        assert store.gc() == 321
    assert [r.getMessage() for r in caplog.records] == [f"gc freed 321 bytes in {tmp_path}"]


# dag-pb written out by hand from dag-pb.proto: PBNode { Links = 2; Data = 1 },
# PBLink { Hash = 1; Name = 2; Tsize = 3 }.
def _link(cid_bytes: bytes, name: bytes | None, tsize: int) -> bytes:
    out = b"\x0a" + bytes([len(cid_bytes)]) + cid_bytes
    if name is not None:
        out += b"\x12" + bytes([len(name)]) + name
    return out + b"\x18" + bytes([tsize])


def test_dag_pb_links_without_a_name_keep_their_bytes_and_their_cid() -> None:
    """_decode_link: `name = ""` when the Name field is absent: re-encoding then writes an
    empty Name, so the node's bytes (and its CID) change. Absent and empty are distinct in
    dag-pb; both must round-trip."""
    leaf = _raw_cid_bytes(b"leaf")
    for name in (None, b"", b"a.txt"):
        link = _link(leaf, name, 4)
        node = b"\x12" + bytes([len(link)]) + link + b"\x0a\x02\x08\x02"
        got = decode_node(node)
        assert got.links[0].name == (None if name is None else name.decode())
        assert encode_node(got) == node
    with pytest.raises(StorageError, match=r"^dag-pb link without a Hash$"):
        decode_node(b"\x12\x02\x18\x04")


def test_unixfs_data_without_a_type_or_with_a_bad_filesize_is_refused_by_name() -> None:
    """decode_unixfs: `type_ = ""` (Data without its required Type accepted); the
    filesize field's name in the wire-type error changed."""
    with pytest.raises(StorageError, match=r"^UnixFS Data without its required Type field$"):
        decode_unixfs(b"\x18\x05")  # filesize = 5, no Type
    with pytest.raises(StorageError,
                       match=r"^UnixFS filesize has protobuf wire type 2, expected 0$"):
        decode_unixfs(b"\x08\x02" b"\x1a\x01\x05")  # filesize as a length-delimited field


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 bytes"), (1023, "1023 bytes"), (1024, "1 KiB"), (1025, "1.001 KiB"),
    (5000, "4.883 KiB"), (3 * 1024 + 1, "3.001 KiB"), (1024**2, "1 MiB"),
    (64 * 1024**3, "64 GiB"), (3 * 1024**4 // 2, "1.5 TiB"),
])
def test_human_bytes(n: int, text: str) -> None:
    """human_bytes: the GiB unit as `1024 * 3`, the KiB unit as 1025 (what `files ls`
    and the StoreFull hints print)."""
    assert human_bytes(n) == text


def test_finishing_an_import_twice_is_refused_by_name() -> None:
    """FileImporter.finish: its RuntimeError without a message."""
    imp = FileImporter()
    imp.feed(b"x")
    imp.finish()
    with pytest.raises(RuntimeError, match=r"^FileImporter.finish\(\) called twice$"):
        imp.finish()


class _Mirror:
    """An uploader that keeps what it is sent (R2Mirror against a real S3 server is in
    test_r2.py; this is drain's side of the Uploader protocol)."""

    def __init__(self) -> None:
        self.sent: list[Cid] = []
        self.have: set[Cid] = set()
        self.broken: dict[Cid, MirrorError] = {}

    def upload_file(self, cid: Cid, path: Path) -> bool:
        if cid in self.broken:
            raise self.broken[cid]
        self.sent.append(cid)
        if cid in self.have:
            return False
        self.have.add(cid)
        return True


def test_mirror_queue_backs_off_5_s_doubling_to_an_hour(tmp_path: Path) -> None:
    """mirrorqueue: no pure test reached it (only daemons in test_files.py). The backoff is
    the module docstring's rule, 5 s * 2**(attempts - 1) capped at 3600 s, written out."""
    cid = Cid.of_block(RAW, b"q")
    with MirrorQueue(tmp_path / "q.db") as q:
        q.enqueue(cid, tmp_path / "f")
        assert len(q) == 1
        now = 100.0
        for attempts, pause in enumerate([5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560,
                                          3600, 3600], start=1):
            assert q.failed(cid, f"boom {attempts}", now) == now + pause
            item = q.pending()[0]
            assert (item.attempts, item.next_at, item.last_error) == (
                attempts, now + pause, f"boom {attempts}")
            assert q.due(now + pause - 0.001) == []
            assert [i.cid for i in q.due(now + pause)] == [cid]
            now += pause
        q.failed(cid, "e" * 5000, now)
        assert q.pending()[0].last_error == "e" * 1000
        assert q.failed(Cid.of_block(RAW, b"not queued"), "x", 7.0) == 7.0
        q.enqueue(cid, tmp_path / "g")  # queued again: due at once, new path
        item = q.pending()[0]
        assert (item.path, item.next_at, len(q)) == (tmp_path / "g", 0.0, 1)
        q.done(cid)
        assert (len(q), q.pending()) == (0, [])


def test_mirror_queue_hands_out_the_longest_waiting_first_in_batches(tmp_path: Path) -> None:
    cids = [Cid.of_block(RAW, bytes([i])) for i in range(5)]
    with MirrorQueue(tmp_path / "q.db") as q:
        for c in cids:
            q.enqueue(c, tmp_path / "f")
        q.failed(cids[0], "x", 0.0)  # due at 5
        q.failed(cids[1], "x", 1.0)  # due at 6
        assert [i.cid for i in q.due(4.0)] == cids[2:]
        assert [i.cid for i in q.due(6.0, limit=4)] == [*cids[2:], cids[0]]
        assert [i.cid for i in q.pending()] == [*cids[2:], cids[0], cids[1]]
        assert str(q.pending()[0].cid) == str(cids[2].to_v1())


def test_drain_uploads_counts_and_stops_at_an_unreachable_mirror(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """drain: what each outcome does to the queue and to the report, and the log line
    that tells an operator a queued file vanished."""
    files = []
    for i in range(5):
        f = tmp_path / f"f{i}"
        f.write_bytes(bytes([i]) * 10)
        files.append((Cid.of_block(RAW, f.read_bytes()), f))
    mirror = _Mirror()
    mirror.have.add(files[1][0])
    mirror.broken[files[2][0]] = MirrorError("bad request")
    with MirrorQueue(tmp_path / "q.db") as q:
        for c, f in files:
            q.enqueue(c, f)
        files[3][1].unlink()
        with caplog.at_level(logging.WARNING, logger="teammesh.storage.mirrorqueue"):
            r = drain(q, mirror, 50.0)
        assert (f"dropping upload of {files[3][0]}: {files[3][1]} no longer exists"
                in [rec.getMessage() for rec in caplog.records])
        assert (r.uploaded, r.already, r.failed, r.dropped, r.unavailable) == (2, 1, 1, 1, False)
        assert mirror.sent == [files[0][0], files[1][0], files[4][0]]
        assert [(i.cid, i.attempts, i.next_at, i.last_error) for i in q.pending()] == [
            (files[2][0], 1, 55.0, "bad request")]
        for c, f in files[:2]:
            q.enqueue(c, f)
        mirror.broken[files[0][0]] = MirrorUnavailable("endpoint down")
        r = drain(q, mirror, 60.0)
        assert (r.uploaded, r.already, r.failed, r.dropped, r.unavailable) == (0, 0, 1, 0, True)
        assert len(q) == 3  # the round stopped: the entries behind it wait
        assert q.pending()[-1].last_error == "endpoint down"


def test_a_block_removed_while_the_store_is_listed_is_skipped(tmp_path: Path) -> None:
    """FsBlockstore._scan: `suppress(None)` (a block deleted between the directory read
    and its stat, by gc or `files rm` in another worker thread, crashed the listing)."""
    store = FsBlockstore(tmp_path)
    by_shard: dict[str, dict[Cid, bytes]] = {}
    for n in range(5000):  # two blocks that land in the same shard directory
        data = n.to_bytes(2, "big")
        cid = Cid.of_block(RAW, data)
        same = by_shard.setdefault(block_path(store, cid).parent.name, {})
        same[cid] = data
        if len(same) == 2:
            break
    for cid, data in same.items():
        store.put(cid, data)
    it = iter(store)
    first = next(it)  # the shard is read; the other block's stat is still to come
    other = next(c for c in same if c != first)
    block_path(store, other).unlink()
    assert list(it) == []
    assert list(store) == [first]


def test_the_mirror_queue_is_used_from_worker_threads(tmp_path: Path) -> None:
    """MirrorQueue.__init__: `check_same_thread` dropped. The node opens the queue on its
    trio thread and drains it through trio.to_thread.run_sync, so any other thread must
    be able to use it."""
    cid = Cid.of_block(RAW, b"t")
    got: list[object] = []
    with MirrorQueue(tmp_path / "q.db") as q:
        def work() -> None:
            try:
                q.enqueue(cid, tmp_path / "f")
                got.append(len(q))
            except Exception as e:  # reported in the assertion below
                got.append(e)
        t = threading.Thread(target=work)
        t.start()
        t.join(timeout=60)
        assert got == [1]
        assert [i.cid for i in q.due(0.0)] == [cid]


MIB = 1024 * 1024


def _closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_r2_part_size_is_at_least_r2s_5_mib_minimum() -> None:
    """R2Mirror.__init__: `part_size < 6 * MIB` (R2's documented minimum part, 5 MiB,
    refused). Making a mirror opens no connection."""
    url = f"http://127.0.0.1:{_closed_loopback_port()}"
    R2Mirror(url, "b", "k", "s", part_size=5 * MIB)
    with pytest.raises(ValueError, match=r"^part_size must be at least 5 MiB"):
        R2Mirror(url, "b", "k", "s", part_size=5 * MIB - 1)
    with pytest.raises(ValueError, match=r"^max_concurrency must be >= 1, got 0$"):
        R2Mirror(url, "b", "k", "s", max_concurrency=0)


def test_an_unreachable_mirror_says_so_and_names_its_endpoint() -> None:
    """R2Mirror.__init__: `self.endpoint_url = None`; _translate: the unreachable message
    changed. test_r2.py needs a live server, so nothing else reached this path; drain()
    stops its round on exactly this error."""
    url = f"http://127.0.0.1:{_closed_loopback_port()}"
    mirror = R2Mirror(url, "bucket", "k", "s", prefix="ipfs/")
    raw = _raw_cid_bytes(b"hello")
    cid = Cid(1, RAW, raw[2:])
    key = "ipfs/b" + base64.b32encode(raw).decode().lower().rstrip("=")
    assert mirror.key(cid) == key
    with pytest.raises(MirrorUnavailable, match=(
            f"^R2 mirror {re.escape(url)} is unreachable \\(HEAD {key}\\): .*; "
            "check the endpoint URL and the network, uploads stay queued$")):
        mirror.exists(cid)


class _ObjectServer(http.server.ThreadingHTTPServer):
    """Just enough of S3's GetObject on loopback: one object, an ETag, ranged GETs, and a
    first response that can break off halfway (what a dropped connection looks like).
    moto and SeaweedFS (test_r2.py) cannot drop a connection on cue."""

    def __init__(self, data: bytes, *, break_first: bool) -> None:
        super().__init__(("127.0.0.1", 0), _ObjectHandler)
        self.data = data
        self.break_first = break_first
        self.requests: list[tuple[str, str | None, str | None]] = []  # path, Range, If-Match
        self.piece_read = threading.Event()  # the client has taken its first piece
        self.orderly_close = False  # break off with a FIN (a proxy's idle timeout), not a reset
        self.error: tuple[int, str] | None = None  # answer every request with this S3 error


class _ObjectHandler(http.server.BaseHTTPRequestHandler):
    server: _ObjectServer

    def do_HEAD(self) -> None:
        self._refuse()

    def _refuse(self) -> bool:
        """Answer with the server's S3 error, if it has one (HEAD gets no body, as in S3)."""
        if self.server.error is None:
            return False
        status, code = self.server.error
        body = b"" if self.command == "HEAD" else (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>{code}</Message></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return True

    def do_GET(self) -> None:
        if self._refuse():
            return
        srv = self.server
        rng, match = self.headers.get("Range"), self.headers.get("If-Match")
        srv.requests.append((self.path, rng, match))
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        body = srv.data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        if srv.break_first and len(srv.requests) == 1:
            self.wfile.write(body[: len(body) // 2])
            # Break off only once the client has its first piece (its progress callback
            # says so), so the resume point is known.
            srv.piece_read.wait(timeout=60)
            # A reset, as a dropped link or a killed proxy gives (SO_LINGER 0), or an
            # orderly close, as a proxy's idle timeout or a server restart gives.
            if not srv.orderly_close:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _object_server(data: bytes, *, break_first: bool = False) -> Iterator[_ObjectServer]:
    srv = _ObjectServer(data, break_first=break_first)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=30)


@pytest.mark.parametrize("orderly", [False, True], ids=["reset", "orderly-close"])
def test_a_download_that_breaks_off_resumes_from_the_same_object(tmp_path: Path,
                                                                  orderly: bool) -> None:
    """R2Mirror.download: the resumed GET with `Key=None` or no Key, and the ETag read as
    `resp.get("etag")` (no ETag: "cannot resume"). The resume must ask for the same key,
    from the byte it got to, pinned to the ETag it saw; after a reset and after an orderly
    close mid-body alike (the latter was a raw botocore IncompleteReadError, not resumed)."""
    data = os.urandom(3 * MIB)
    src = tmp_path / "src"
    src.write_bytes(data)
    cid = cid_of_file(src)
    with _object_server(data, break_first=True) as srv:
        srv.orderly_close = orderly
        mirror = R2Mirror(f"http://127.0.0.1:{srv.server_address[1]}", "bkt", "k", "s")
        got = mirror.download(cid, tmp_path / "out", lambda n: srv.piece_read.set())
        assert got == len(data)
        key_path = f"/bkt/{mirror.key(cid)}"
        assert srv.requests[0] == (key_path, None, None)
        # a reset loses what was in flight: it resumes after the client's first 1 MiB
        # piece; after an orderly close the client has all the server sent (half)
        resumed_at = len(data) // 2 if orderly else MIB
        assert srv.requests[1:] == [(key_path, f"bytes={resumed_at}-", '"v1"')]
    assert (tmp_path / "out").read_bytes() == data
    assert not (tmp_path / "out.partial").exists()


def test_a_download_over_max_bytes_is_refused_by_its_claimed_size(tmp_path: Path) -> None:
    """R2Mirror.download: `over_limit(cid, max_bytes)` (a TypeError instead of
    FileTooLarge) and ContentLength read as `"contentlength"` (the claimed size not checked
    before the body is read). Nothing is left behind."""
    data = os.urandom(3 * MIB)
    src = tmp_path / "src"
    src.write_bytes(data)
    cid = cid_of_file(src)
    with _object_server(data) as srv:
        mirror = R2Mirror(f"http://127.0.0.1:{srv.server_address[1]}", "bkt", "k", "s")
        with pytest.raises(FileTooLarge) as e:
            mirror.download(cid, tmp_path / "out", max_bytes=MIB)
    assert (e.value.size, e.value.limit) == (3 * MIB, MIB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_mirror_that_refuses_says_why_and_what_to_do(tmp_path: Path) -> None:
    """R2Mirror.size_of: `_translate(None, ...)` for an S3 error answer; _translate: the
    missing-bucket hint changed. Wrong credentials and a mistyped bucket are the two
    refusals an operator meets first."""
    cid = Cid(1, RAW, _raw_cid_bytes(b"x")[2:])
    with _object_server(b"") as srv:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        mirror = R2Mirror(url, "bkt", "k", "s")
        srv.error = (403, "AccessDenied")
        with pytest.raises(MirrorAuthError, match=(
                f"^R2 mirror {re.escape(url)} rejected our credentials \\(403\\) on HEAD "
                f"{mirror.key(cid)}: check the access key id and secret$")):
            mirror.exists(cid)
        srv.error = (404, "NoSuchBucket")
        with pytest.raises(MirrorError, match=(
                f"^bucket 'bkt' does not exist at {re.escape(url)}: create it "
                r"\(R2Mirror\.ensure_bucket\) or fix the bucket name$")):
            mirror.download(cid, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
