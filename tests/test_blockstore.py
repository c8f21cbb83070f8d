"""The file-system block store (teammesh.storage.blockstore): verified blocks, pins, gc,
the size limit, streaming add/export and a full disk.

Everything runs on real files in ``tmp_path``. A full disk is the kernel's: writes go
to ``/dev/full`` through a symlink where the store would create its file.
"""

from __future__ import annotations

import os
import random
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from teammesh.protocols.errors import StorageError
from teammesh.storage.blockstore import (
    BlockNotFound,
    CorruptBlock,
    DiskFull,
    FsBlockstore,
    StoreFull,
)
from teammesh.storage.cid import RAW, Cid
from teammesh.storage.unixfs import CHUNK_SIZE, cid_of_file

MIB = 1024 * 1024
HAS_DEV_FULL = os.path.exists("/dev/full")


def write_random(path: Path, size: int, seed: int = 0) -> Path:
    """A file of ``size`` seeded random bytes, written 4 MiB at a time."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(rng.randbytes(n))
            left -= n
    return path


def block_path(store: FsBlockstore, cid: Cid) -> Path:
    name = str(cid.to_v1())
    return store.root / "blocks" / name[-3:-1] / name


def raw_block(data: bytes) -> tuple[Cid, bytes]:
    return Cid.of_block(RAW, data), data


# -- blocks --------------------------------------------------------------------------------


def test_put_get_has_delete_iter(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path / "s")
    blocks = [raw_block(bytes([i]) * (100 + i)) for i in range(5)]
    for cid, data in blocks:
        assert store.put(cid, data)
    assert not store.put(*blocks[0])  # already there
    assert all(store.has(cid) and store.get(cid) == data for cid, data in blocks)
    assert set(store) == {cid for cid, _ in blocks}
    assert store.size_bytes == sum(len(d) for _, d in blocks)
    assert store.delete(blocks[0][0])
    assert not store.delete(blocks[0][0])
    assert not store.has(blocks[0][0])
    with pytest.raises(BlockNotFound):
        store.get(blocks[0][0])
    assert store.size_bytes == sum(len(d) for _, d in blocks[1:])
    # Sizes survive a restart; nothing is left in tmp/.
    again = FsBlockstore(tmp_path / "s")
    assert again.size_bytes == store.size_bytes
    assert again.block_count == 4
    assert not list((tmp_path / "s" / "tmp").iterdir())


def test_put_refuses_bytes_that_do_not_match(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path)
    cid, _ = raw_block(b"hello")
    with pytest.raises(CorruptBlock):
        store.put(cid, b"HELLO")
    assert not store.has(cid)
    assert store.size_bytes == 0


def test_cidv0_and_v1_name_the_same_block(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path)
    root, _ = store.add_file(write_random(tmp_path / "f", CHUNK_SIZE + 1))
    v0 = Cid(0, root.codec, root.multihash)
    assert store.get(v0) == store.get(root)


def test_corrupt_block_is_detected_counted_and_removed(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path)
    cid, data = raw_block(b"x" * 1000)
    store.put(cid, data)
    block_path(store, cid).write_bytes(b"y" * 1000)  # bit rot
    with pytest.raises(CorruptBlock, match="corrupted on disk") as info:
        store.get(cid)
    assert isinstance(info.value, StorageError)
    assert store.corrupt_blocks == 1
    assert not store.has(cid)
    assert store.size_bytes == 0
    store.put(cid, data)  # fetched again
    assert store.get(cid) == data


# -- pins and gc ---------------------------------------------------------------------------


def test_pin_unpin_gc(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path / "s")
    a, size_a = store.add_file(write_random(tmp_path / "a", 3 * MIB, seed=1))
    b, _ = store.add_file(write_random(tmp_path / "b", 2 * MIB, seed=2))
    loose, data = raw_block(b"not pinned")
    store.put(loose, data)
    assert set(store.pins()) == {a, b}
    assert store.gc() == len(data)  # only the loose block goes
    assert not store.has(loose)

    assert store.unpin(a)
    assert not store.unpin(a)
    before = store.size_bytes
    freed = store.gc()
    assert freed >= size_a
    assert store.size_bytes == before - freed
    assert store.file_size(b) == 2 * MIB
    store.export(b, tmp_path / "b.out")
    assert (tmp_path / "b.out").read_bytes() == (tmp_path / "b").read_bytes()
    with pytest.raises(BlockNotFound):
        store.file_size(a)


def test_pin_reports_missing_blocks(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path)
    root, _ = store.add_file(write_random(tmp_path / "f", 3 * CHUNK_SIZE))
    leaves = [c for c in store if c.codec == RAW]
    store.delete(leaves[1])
    assert store.pin(root) == [leaves[1]]
    assert store.pin(Cid.of_block(RAW, b"elsewhere")) == [Cid.of_block(RAW, b"elsewhere")]


def test_gc_spares_blocks_of_an_open_write_session(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path)
    old, old_data = raw_block(b"old garbage")
    store.put(old, old_data)
    t = time.time() - 60
    os.utime(block_path(store, old), (t, t))
    with store.writing():
        new, data = raw_block(b"fetched, pin comes later")
        store.put(new, data)
        assert store.gc() == len(old_data)
        assert store.has(new)
        assert not store.has(old)
        store.pin(new)
    assert store.gc() == 0
    assert store.has(new)


# -- limit ---------------------------------------------------------------------------------


def test_limit_raises_store_full_after_gc(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path / "s", limit_bytes=3 * MIB)
    a, _ = store.add_file(write_random(tmp_path / "a", 2 * MIB, seed=1))
    with pytest.raises(StoreFull, match="teammesh files gc") as info:
        store.add_file(write_random(tmp_path / "b", 2 * MIB, seed=2))
    assert "raise the storage limit" in str(info.value)
    assert store.size_bytes <= 3 * MIB
    with pytest.raises(StoreFull):  # larger than the whole limit: refused up front
        store.add_file(write_random(tmp_path / "c", 4 * MIB, seed=3))
    # Unpinning makes room: the next put collects a's blocks and b's leftovers.
    store.unpin(a)
    b, size = store.add_file(tmp_path / "b")
    assert size == 2 * MIB
    assert store.pins() == [b]
    assert store.size_bytes <= 3 * MIB
    # A single put over the limit, after gc has nothing left to free.
    full = FsBlockstore(tmp_path / "t", limit_bytes=1000)
    full.put(*raw_block(b"a" * 600))
    full.pin(raw_block(b"a" * 600)[0])
    with pytest.raises(StoreFull):
        full.put(*raw_block(b"b" * 600))
    assert full.size_bytes == 600
    full.ensure_room(400)
    with pytest.raises(StoreFull):
        full.ensure_room(401)


def test_adding_the_same_file_twice_fits(tmp_path: Path) -> None:
    f = write_random(tmp_path / "f", 2 * MIB)
    store = FsBlockstore(tmp_path / "s", limit_bytes=2 * MIB + 4096)
    first = store.add_file(f)
    assert store.add_file(f) == first


# -- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE + 1, 50 * MIB])
def test_add_export_round_trip(tmp_path: Path, size: int) -> None:
    src = write_random(tmp_path / "src", size, seed=size)
    store = FsBlockstore(tmp_path / "s")
    root, n = store.add_file(src)
    assert n == size
    assert root == cid_of_file(src)
    assert store.pins() == [root]
    assert store.file_size(root) == size
    seen: list[tuple[int, int]] = []
    dest = tmp_path / "out"
    assert store.export(root, dest, progress=lambda d, t: seen.append((d, t))) == size
    assert dest.read_bytes() == src.read_bytes()
    assert not (tmp_path / "out.partial").exists()
    if size:
        assert seen[-1] == (size, size)


def test_memory_stays_flat_on_100_mib(tmp_path: Path) -> None:
    size = 100 * MIB
    src = write_random(tmp_path / "src", size)
    store = FsBlockstore(tmp_path / "s")
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        root, _ = store.add_file(src)
        t_add = time.perf_counter() - t0
        _, peak_add = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        store.export(root, tmp_path / "out")
        t_export = time.perf_counter() - t0
        _, peak_export = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(
        f"\n100 MiB: add {100 / t_add:.0f} MiB/s (peak {peak_add / MIB:.1f} MiB), "
        f"export {100 / t_export:.0f} MiB/s (peak {peak_export / MIB:.1f} MiB)"
    )
    # A 4 MiB read buffer plus that piece's blocks; export holds one block at a time.
    assert peak_add < 12 * MIB
    assert peak_export < 4 * MIB
    assert root == cid_of_file(tmp_path / "out")


def test_export_failing_midway_leaves_no_file(tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", 20 * CHUNK_SIZE)
    store = FsBlockstore(tmp_path / "s")
    root, _ = store.add_file(src)
    with open(src, "rb") as f:
        f.seek(10 * CHUNK_SIZE)
        leaf = Cid.of_block(RAW, f.read(CHUNK_SIZE))
    block_path(store, leaf).write_bytes(b"\0" * CHUNK_SIZE)
    seen: list[int] = []
    dest = tmp_path / "out"
    with pytest.raises(CorruptBlock):
        store.export(root, dest, progress=lambda d, t: seen.append(d))
    assert seen[-1] == 10 * CHUNK_SIZE  # it failed midway, not up front
    assert not dest.exists()
    assert not (tmp_path / "out.partial").exists()
    assert store.corrupt_blocks == 1
    # The pin now reports the block to fetch again.
    assert store.pin(root) == [leaf]


@pytest.mark.skipif(not HAS_DEV_FULL, reason="needs /dev/full (Linux)")
def test_disk_full_on_export(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path / "s")
    root, _ = store.add_file(write_random(tmp_path / "src", 2 * MIB))
    dest = tmp_path / "out"
    (tmp_path / "out.partial").symlink_to("/dev/full")
    with pytest.raises(DiskFull, match="no space left"):
        store.export(root, dest)
    assert not dest.exists()
    assert not os.path.lexists(tmp_path / "out.partial")


@pytest.mark.skipif(not HAS_DEV_FULL, reason="needs /dev/full (Linux)")
def test_disk_full_on_put(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path)
    cid, data = raw_block(b"z" * 5000)
    # Where this thread's put will write its temporary file.
    tmp = tmp_path / "tmp" / f"{cid}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.symlink_to("/dev/full")
    with pytest.raises(DiskFull, match="no space left"):
        store.put(cid, data)
    assert not os.path.lexists(tmp)
    assert not store.has(cid)
    assert store.size_bytes == 0
    assert not list((tmp_path / "tmp").iterdir())


# -- files made of repeated blocks ---------------------------------------------------------


def test_a_repeated_block_file_is_walked_once_and_refused_on_export(tmp_path: Path) -> None:
    from teammesh.storage.unixfs import DEFAULT_MAX_FILE_BYTES, FileTooLarge
    from test_cid import repeated_dag

    store = FsBlockstore(tmp_path / "s")
    root, claimed, blocks = repeated_dag(4)
    for cid, data in blocks[1:]:
        store.put(cid, data)
    # the walk reads each distinct block once: the missing leaf is reported once
    assert store.missing(root) == [blocks[0][0]]
    store.put(*blocks[0])
    assert store.missing(root) == []
    assert store.file_size(root) == claimed  # what it claims, not believed by export
    dest = tmp_path / "out"
    with pytest.raises(FileTooLarge, match=str(DEFAULT_MAX_FILE_BYTES)):
        store.export(root, dest)
    with pytest.raises(FileTooLarge, match="limit for one file \\(1048576 bytes\\)"):
        store.export(root, dest, max_size=MIB)
    assert not dest.exists()
    assert not dest.with_name("out.partial").exists()
