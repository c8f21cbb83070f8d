"""The local block store: one verified file per block, pins, garbage collection, a limit.

Layout under ``root``::

    blocks/<shard>/<cid>   one file per block; <cid> is the base32 CIDv1 string and
                           <shard> its two characters before the last (Kubo flatfs's
                           ``next-to-last/2``: evenly spread, unlike the constant prefix)
    pins/<cid>             one empty file per recursively pinned root
    tmp/                   files being written; renamed into blocks/ when complete

Invariants:

* A file under ``blocks/`` appears only complete (written to ``tmp/``, then renamed)
  and is checked against its CID on every read. A block that fails the check is
  deleted, counted in :attr:`FsBlockstore.corrupt_blocks` and reported as
  :class:`CorruptBlock`; it can then be fetched again. Blocks are not fsynced one by
  one (that would cost more than the hashing): after a crash a torn block is caught by
  that same check.
* A CIDv0 names the same bytes as the CIDv1 with the same multihash, so blocks are
  filed under their CIDv1 and iteration yields CIDv1s.
* :meth:`FsBlockstore.gc` deletes the blocks not reachable from a pin, except those
  written or re-used since the start of the oldest write session still open
  (:meth:`FsBlockstore.writing`, used by :meth:`FsBlockstore.add_file`): a file being
  imported, or a DAG being fetched, is not collected before its pin exists. Blocks
  under a missing or corrupt interior node cannot be reached, so they are collected.
* With ``limit_bytes`` set, the bytes of all blocks never exceed it: a put that would
  cross it runs :meth:`FsBlockstore.gc` once and then raises :class:`StoreFull`.
* A full disk (``ENOSPC``/``EDQUOT``) raises :class:`DiskFull` and leaves no temporary
  or partial file behind.

Everything is synchronous and thread-safe; the node calls it through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from teammesh.protocols.errors import StorageError

from .cid import RAW, Cid
from .unixfs import CHUNK_SIZE, DEFAULT_MAX_FILE_BYTES, FileExporter, FileImporter, links_of

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "MAX_BLOCK_BYTES",
    "BlockNotFound",
    "CorruptBlock",
    "DiskFull",
    "FsBlockstore",
    "StoreFull",
]

logger = logging.getLogger(__name__)

MAX_BLOCK_BYTES: Final = 2 * 1024 * 1024  # Bitswap's limit; our chunks are 256 KiB
READ_SIZE_BYTES: Final = 16 * CHUNK_SIZE  # 4 MiB pieces when importing a file
STALE_TMP_S: Final = 3600.0  # tmp files older than this are leftovers of a crash
# gc spares blocks whose mtime is this close to a write session's start: mtime and
# time.time() can disagree by a clock tick on some file systems.
MTIME_SLACK_S: Final = 2.0
_FULL_ERRNOS: Final = (errno.ENOSPC, errno.EDQUOT)


class BlockNotFound(StorageError):
    """The block is not in the local store."""


class CorruptBlock(StorageError):
    """A block's bytes do not hash to its CID (it was deleted from the store)."""


class StoreFull(StorageError):
    """The store would go over its configured size limit, even after gc."""


class DiskFull(StorageError):
    """The file system under the store (or an export's destination) has no space left."""


def _name(cid: Cid) -> str:
    return str(cid.to_v1())


def _disk_full(e: OSError, where: Path) -> DiskFull:
    return DiskFull(
        f"no space left on the disk holding {where}: free some space "
        f"(or run `teammesh files gc`) and try again ({os.strerror(e.errno or 0)})"
    )


class FsBlockstore:
    """A block store in a directory (see the module docstring for layout and rules).

    Args:
        root: the store's directory; created if missing.
        limit_bytes: the most bytes of blocks to keep, or ``None`` for no limit.
    """

    def __init__(self, root: Path, limit_bytes: int | None = None) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"limit_bytes must be >= 0 or None, got {limit_bytes}")
        self.root = Path(root)
        self.limit_bytes = limit_bytes
        self._blocks = self.root / "blocks"
        self._pins = self.root / "pins"
        self._tmp = self.root / "tmp"
        for d in (self._blocks, self._pins, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sessions: dict[int, float] = {}  # write session id -> start time
        self._next_session = 0
        self.corrupt_blocks = 0
        self._clean_tmp()
        self._used = sum(size for _, _, size in self._scan())

    # -- blocks -------------------------------------------------------------------------

    def _path(self, cid: Cid) -> Path:
        name = _name(cid)
        return self._blocks / name[-3:-1] / name

    def has(self, cid: Cid) -> bool:
        """Whether the block is stored (not verified: a read does that)."""
        return self._path(cid).is_file()

    def get(self, cid: Cid) -> bytes:
        """The block's bytes, checked against ``cid``.

        Raises:
            BlockNotFound: the block is not stored.
            CorruptBlock: the stored bytes do not match; the file has been deleted.
        """
        path = self._path(cid)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BLOCK_BYTES + 1)
        except FileNotFoundError:
            raise BlockNotFound(f"block {cid} is not in the local store") from None
        if len(data) > MAX_BLOCK_BYTES or not cid.verify(data):
            self._discard_corrupt(cid, path)
            raise CorruptBlock(
                f"block {cid} in {self.root} was corrupted on disk; it has been removed "
                "and will be fetched again when needed"
            )
        return data

    def _discard_corrupt(self, cid: Cid, path: Path) -> None:
        with self._lock:
            self.corrupt_blocks += 1
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return  # another thread got there first
            self._used -= size
        logger.warning("deleted corrupt block %s from %s", cid, self.root)

    def put(self, cid: Cid, data: bytes | memoryview, *, verified: bool = False) -> bool:
        """Store a block after checking it against ``cid``; True if it was new.

        ``verified=True`` skips the hash for bytes the caller has just checked against
        ``cid`` itself (Bitswap verifies every block it accepts).

        Raises:
            CorruptBlock: ``data`` does not hash to ``cid`` (nothing is written).
            StoreFull: storing it would exceed ``limit_bytes`` even after gc.
            DiskFull: the disk is full.
        """
        if len(data) > MAX_BLOCK_BYTES or not (verified or cid.verify(data)):
            raise CorruptBlock(f"refusing block {cid}: its bytes do not match the CID")
        return self._put(cid, data, allow_gc=True)

    def _put(self, cid: Cid, data: bytes | bytearray | memoryview, *, allow_gc: bool) -> bool:
        path = self._path(cid)
        if path.is_file():
            # Re-using a block counts as writing it: an open write session protects it.
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
                return False
        n = len(data)
        self._reserve(n, allow_gc=allow_gc)
        tmp = self._tmp / f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                path.parent.mkdir(exist_ok=True)
                os.replace(tmp, path)
        except OSError as e:
            self._release(n)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if e.errno in _FULL_ERRNOS:
                raise _disk_full(e, self.root) from None
            raise
        return True

    def delete(self, cid: Cid) -> bool:
        """Remove a block (pinned or not); True if it was there."""
        path = self._path(cid)
        with self._lock:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return False
            self._used -= size
        return True

    @property
    def size_bytes(self) -> int:
        """Total bytes of the stored blocks."""
        return self._used

    def __iter__(self) -> Iterator[Cid]:
        """Every stored block's CID (CIDv1), in no particular order."""
        for name, _, _ in self._scan():
            try:
                yield Cid.parse(name)
            except StorageError:
                continue  # a stray file, not a block

    @property
    def block_count(self) -> int:
        """How many blocks are stored (a directory scan)."""
        return sum(1 for _ in self._scan())

    def _scan(self) -> Iterator[tuple[str, Path, int]]:
        """(name, path, size) of every file under blocks/."""
        for shard in os.scandir(self._blocks):
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard.path):
                with contextlib.suppress(FileNotFoundError):
                    yield entry.name, Path(entry.path), entry.stat().st_size

    def _clean_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_S
        for entry in os.scandir(self._tmp):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)

    # -- limit --------------------------------------------------------------------------

    def _reserve(self, n: int, *, allow_gc: bool) -> None:
        """Count ``n`` more bytes, or raise StoreFull (after one gc if allowed)."""
        if self._try_reserve(n):
            return
        if allow_gc:
            self.gc()
            if self._try_reserve(n):
                return
        raise self._full(n)

    def _try_reserve(self, n: int) -> bool:
        with self._lock:
            if self.limit_bytes is not None and self._used + n > self.limit_bytes:
                return False
            self._used += n
            return True

    def _release(self, n: int) -> None:
        with self._lock:
            self._used -= n

    def _full(self, n: int) -> StoreFull:
        return StoreFull(
            f"block store {self.root} is full: {self._used:,} of {self.limit_bytes:,} "
            f"bytes used and {n:,} more needed; raise the storage limit, or free space "
            "with `teammesh files gc` after unpinning files you no longer need"
        )

    def ensure_room(self, n: int) -> None:
        """Make sure ``n`` more bytes fit under the limit, running gc if they do not.

        Raises:
            StoreFull: they do not fit even after gc.
        """
        if self.limit_bytes is None or self._used + n <= self.limit_bytes:
            return
        self.gc()
        if self._used + n > self.limit_bytes:
            raise self._full(n)

    # -- write sessions -----------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Protect the blocks written or re-used inside this block from gc.

        Use it around fetching a DAG whose pin comes last; pin before leaving it.
        """
        with self._lock:
            sid = self._next_session
            self._next_session += 1
            self._sessions[sid] = time.time()
        try:
            yield
        finally:
            with self._lock:
                del self._sessions[sid]

    # -- pins and gc --------------------------------------------------------------------

    def pin(self, root: Cid) -> list[Cid]:
        """Pin ``root`` and everything under it; return the blocks of it still missing.

        The pin holds even while blocks are missing (they are not collected once they
        arrive). Corrupt blocks met on the walk are deleted and reported as missing.
        """
        (self._pins / _name(root)).touch()
        return [cid for cid, present in self._walk(root) if not present]

    def unpin(self, root: Cid) -> bool:
        """Remove a pin; True if there was one. The blocks stay until :meth:`gc`."""
        try:
            (self._pins / _name(root)).unlink()
        except FileNotFoundError:
            return False
        return True

    def pins(self) -> list[Cid]:
        """The pinned roots (CIDv1)."""
        out = []
        for entry in os.scandir(self._pins):
            with contextlib.suppress(StorageError):
                out.append(Cid.parse(entry.name))
        return out

    def missing(self, root: Cid) -> list[Cid]:
        """The blocks under ``root`` not in the store (each distinct block read once, so a
        DAG that links one block many times costs what its distinct blocks cost)."""
        return [cid for cid, present in self._walk(root) if not present]

    def _walk(self, root: Cid) -> Iterator[tuple[Cid, bool]]:
        """(cid, present) for every block reachable from ``root``, depth first."""
        stack = [root]
        seen: set[Cid] = set()
        while stack:
            cid = stack.pop().to_v1()
            if cid in seen:
                continue
            seen.add(cid)
            if cid.codec == RAW:  # leaves have no links: no need to read them
                yield cid, self.has(cid)
                continue
            try:
                block = self.get(cid)
            except (BlockNotFound, CorruptBlock):
                yield cid, False
                continue
            yield cid, True
            stack.extend(links_of(cid, block))

    def gc(self) -> int:
        """Delete unpinned, unreachable blocks (see the module docstring); return bytes freed."""
        with self._lock:
            started = min(self._sessions.values(), default=None)
        cutoff = time.time() if started is None else started - MTIME_SLACK_S
        live = {_name(cid) for pin in self.pins() for cid, _ in self._walk(pin)}
        freed = 0
        for name, path, _ in list(self._scan()):
            if name in live:
                continue
            with self._lock:
                try:
                    st = path.stat()
                    if st.st_mtime >= cutoff:
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue
                self._used -= st.st_size
            freed += st.st_size
        if freed:
            logger.info("gc freed %d bytes in %s", freed, self.root)
        return freed

    # -- files --------------------------------------------------------------------------

    def add_file(self, path: Path) -> tuple[Cid, int]:
        """Import a file as ``ipfs add --cid-version=1`` would, store its blocks, pin it.

        Reads in 4 MiB pieces: memory stays flat whatever the file size.

        Returns:
            The root CID and the file size in bytes.

        Raises:
            StoreFull: the file is larger than the limit, or its blocks do not fit even
                after gc; the blocks written so far stay unpinned (gc removes them).
            DiskFull: the disk filled up; likewise.
        """
        size = os.stat(path).st_size
        # File bytes plus about 0.03% of dag-pb nodes. Blocks already stored (a file
        # added twice) make this an over-estimate, so it only decides whether to gc up
        # front; the block-by-block check is the strict one.
        estimate = size + size // 2048 + 4096
        if self.limit_bytes is not None:
            if size > self.limit_bytes:
                raise self._full(estimate)
            if self._used + estimate > self.limit_bytes:
                self.gc()
        imp = FileImporter()
        buf = bytearray(READ_SIZE_BYTES)
        view = memoryview(buf)
        with self.writing():
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    for cid, block in imp.feed(view[:n]):
                        self._put(cid, block, allow_gc=False)
            root, blocks = imp.finish()
            for cid, block in blocks:
                self._put(cid, block, allow_gc=False)
            (self._pins / _name(root)).touch()
        return root, imp.bytes_fed

    def export(
        self,
        root: Cid,
        dest: Path,
        progress: Callable[[int, int], None] | None = None,
        get_block: Callable[[Cid], bytes] | None = None,
        *,
        max_size: int | None = DEFAULT_MAX_FILE_BYTES,
    ) -> int:
        """Write the file ``root`` to ``dest``, every block verified; return its size.

        ``get_block`` replaces :meth:`get` (a caller that waits for blocks in flight).
        A root claiming more than ``max_size`` bytes is refused before anything is written.

        The bytes go to ``dest + ".partial"``, renamed to ``dest`` only when complete:
        ``dest`` never holds a partial file. Not fsynced (as cp, curl or ``ipfs get``):
        the pinned blocks stay in the store, and forcing 256 MiB to disk cost as much as
        fetching it. ``progress(done, total)``
        is called after each block.

        Raises:
            BlockNotFound: a block is missing (fetch it first).
            CorruptBlock: a block is corrupt (it was deleted; fetch it again).
            DiskFull: the destination's disk filled up.
            StorageError: the file claims more than ``max_size`` bytes, or is malformed.
        """
        dest = Path(dest)
        partial = dest.with_name(dest.name + ".partial")
        exporter = FileExporter(root, get_block or self.get, max_size=max_size)
        total = exporter.size()
        done = 0
        try:
            with open(partial, "wb") as f:
                for piece in exporter:
                    f.write(piece)
                    done += len(piece)
                    if progress is not None:
                        progress(done, total)
            os.replace(partial, dest)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
                raise _disk_full(e, dest.parent) from None
            raise
        return total

    def file_size(self, root: Cid) -> int:
        """The size the file ``root`` claims (reads and verifies only the root block)."""
        return FileExporter(root, self.get, max_size=None).size()
