"""Streaming UnixFS file import and export, CID-for-CID identical to Kubo's ``ipfs add``.

Import (defaults = ``ipfs add --cid-version=1``):

* the file is cut into fixed 262,144-byte chunks (the last one may be shorter);
* each chunk is a *raw leaf*: a CIDv1 with codec raw (0x55) and a sha2-256 multihash;
* leaves hang from a *balanced* tree of dag-pb (0x70) nodes with at most 174 links
  each. Every leaf sits at the same depth ``D``, the smallest with ``174**D >= chunks``.
  Each internal node carries UnixFS ``Data{Type=File, filesize, blocksizes}`` and links
  ``{Hash, Name="", Tsize}`` where ``Tsize`` is the total encoded size of the linked
  subtree (a raw leaf's ``Tsize`` is its length);
* a single-chunk file is the raw leaf itself; the empty file is the empty raw block
  (``bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku``);
* the rightmost, partially filled subtrees are wrapped level by level, even when they
  hold a single child, exactly as go-unixfs's balanced builder does (its ``fillNodeRec``
  always descends to depth 1 before adding a leaf).

``cid_version=0`` gives Kubo's historical default (CIDv0, dag-pb leaves holding the
chunk in UnixFS ``Data``).

The importer keeps only a partial chunk and, per tree level, the links not yet packed
into a parent (< 174 each): memory is bounded whatever the file size. Completed blocks
are handed back from :meth:`FileImporter.feed` so they can be stored as they appear.

Export walks a DAG depth-first with an explicit stack, checking every block against its
CID and every size against its parent's ``blocksizes``; any mismatch raises
:class:`teammesh.protocols.errors.StorageError`.

A DAG may link the same block many times, so a few kilobytes of blocks can claim any size
(174 links to one node, 174 times over, claims 214 TiB). Sizes are therefore only believed
up to a limit: every export refuses a root that claims more than ``max_size`` bytes
(``DEFAULT_MAX_FILE_BYTES`` unless the caller says otherwise) before it reads a second
block, and the sizes checked on the way down keep it to what the root claimed.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Final

from .cid import DAG_PB, RAW, Cid, StorageError
from .dagpb import (
    UNIXFS_FILE,
    UNIXFS_RAW,
    PBLink,
    PBNode,
    UnixFSData,
    decode_node,
    decode_unixfs,
    encode_node,
    encode_unixfs,
)

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Iterator

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_MAX_FILE_BYTES",
    "MAX_LINKS",
    "Block",
    "FileExporter",
    "FileImporter",
    "FileTooLarge",
    "cid_of_bytes",
    "cid_of_file",
    "claimed_size",
    "export_file",
    "human_bytes",
    "links_of",
    "over_limit",
]

CHUNK_SIZE: Final = 262_144
MAX_LINKS: Final = 174
MAX_DEPTH: Final = 64
DEFAULT_MAX_FILE_BYTES: Final = 64 * 1024**3  # the largest file a node believes (64 GiB)
_READ_SIZE: Final = 16 * CHUNK_SIZE

Block = tuple[Cid, bytes]
# A pending link: (child CID, Tsize of the child's subtree, bytes of file it covers).
_Pending = tuple[Cid, int, int]


class FileImporter:
    """Incremental importer: ``feed`` bytes in any pieces, then ``finish``.

    ``keep_blocks=False`` only computes the root CID: leaves are hashed straight from the
    caller's buffer without being copied, and ``feed``/``finish`` return no blocks.
    ``raw_leaves`` defaults to ``cid_version == 1``, as in Kubo.
    """

    def __init__(
        self,
        *,
        cid_version: int = 1,
        raw_leaves: bool | None = None,
        chunk_size: int = CHUNK_SIZE,
        max_links: int = MAX_LINKS,
        keep_blocks: bool = True,
    ) -> None:
        if cid_version not in (0, 1):
            raise ValueError(f"cid_version must be 0 or 1, got {cid_version}")
        if raw_leaves is None:
            raw_leaves = cid_version == 1
        if raw_leaves and cid_version == 0:
            raise ValueError("raw leaves need CIDv1")
        if chunk_size < 1 or max_links < 2:
            raise ValueError("chunk_size must be >= 1 and max_links >= 2")
        self._version = cid_version
        self._raw_leaves = raw_leaves
        self._chunk_size = chunk_size
        self._max_links = max_links
        self._keep = keep_blocks
        self._buf = bytearray()
        self._levels: list[list[_Pending]] = [[]]
        self._chunks = 0
        self._size = 0
        self._done = False

    @property
    def bytes_fed(self) -> int:
        """How many bytes of file content were fed so far."""
        return self._size

    def feed(self, data: bytes | bytearray | memoryview) -> list[Block]:
        """Absorb more file content; return the blocks completed by it (maybe none)."""
        if self._done:
            raise RuntimeError("FileImporter.feed() after finish()")
        out: list[Block] = []
        view = memoryview(data).cast("B")
        self._size += len(view)
        size = self._chunk_size
        buf = self._buf
        if buf:
            need = size - len(buf)
            buf += view[:need]
            view = view[need:]
            if len(buf) < size:
                return out
            self._add_chunk(bytes(buf) if self._keep else buf, out)
            buf.clear()
        pos = 0
        end = len(view)
        while end - pos >= size:
            self._add_chunk(view[pos : pos + size], out)
            pos += size
        if pos < end:
            buf += view[pos:]
        return out

    def finish(self) -> tuple[Cid, list[Block]]:
        """Flush the last chunk and the pending tree levels; return ``(root, blocks)``."""
        if self._done:
            raise RuntimeError("FileImporter.finish() called twice")
        self._done = True
        out: list[Block] = []
        if self._buf or self._chunks == 0:  # the empty file is one empty leaf
            self._add_chunk(bytes(self._buf), out)
            self._buf.clear()
        depth = 0
        capacity = 1
        while capacity < self._chunks:
            capacity *= self._max_links
            depth += 1
        while len(self._levels) <= depth:
            self._levels.append([])
        for level in range(depth):
            if self._levels[level]:
                self._levels[level + 1].append(self._make_node(self._levels[level], out))
                self._levels[level] = []
        top = self._levels[depth]
        if len(top) != 1 or any(self._levels[depth + 1 :]):  # pragma: no cover - invariant
            raise AssertionError("balanced DAG builder left an inconsistent tree")
        return top[0][0], out

    # -- internals -----------------------------------------------------------------------

    def _add_chunk(self, chunk: bytes | bytearray | memoryview, out: list[Block]) -> None:
        self._chunks += 1
        n = len(chunk)
        if self._raw_leaves:
            cid = Cid.from_sha256(RAW, hashlib.sha256(chunk).digest(), 1)
            if self._keep:
                out.append((cid, chunk if isinstance(chunk, bytes) else bytes(chunk)))
            self._push(0, (cid, n, n), out)
            return
        unixfs = encode_unixfs(UnixFSData(UNIXFS_FILE, bytes(chunk), n))
        block = encode_node(PBNode((), unixfs))
        cid = Cid.of_block(DAG_PB, block, self._version)
        if self._keep:
            out.append((cid, block))
        self._push(0, (cid, len(block), n), out)

    def _push(self, level: int, entry: _Pending, out: list[Block]) -> None:
        """Append a finished subtree at ``level``; pack full levels upward eagerly.

        A full node is the same whatever follows, so packing it as soon as it has
        ``max_links`` children is safe and keeps every level below ``max_links``.
        """
        while True:
            pending = self._levels[level]
            pending.append(entry)
            if len(pending) < self._max_links:
                return
            entry = self._make_node(pending, out)
            self._levels[level] = []
            level += 1
            if len(self._levels) <= level:
                self._levels.append([])

    def _make_node(self, children: list[_Pending], out: list[Block]) -> _Pending:
        filesize = sum(c[2] for c in children)
        unixfs = encode_unixfs(
            UnixFSData(UNIXFS_FILE, None, filesize, tuple(c[2] for c in children))
        )
        block = encode_node(PBNode(tuple(PBLink(c[0], "", c[1]) for c in children), unixfs))
        cid = Cid.of_block(DAG_PB, block, self._version)
        if self._keep:
            out.append((cid, block))
        return cid, len(block) + sum(c[1] for c in children), filesize


def cid_of_bytes(data: bytes | bytearray | memoryview, *, cid_version: int = 1) -> Cid:
    """The root CID ``ipfs add`` would give ``data`` (CIDv1 raw leaves by default)."""
    imp = FileImporter(cid_version=cid_version, keep_blocks=False)
    imp.feed(data)
    return imp.finish()[0]


def cid_of_file(path: str | os.PathLike[str], *, cid_version: int = 1) -> Cid:
    """The root CID ``ipfs add`` would give the file at ``path``, read in 4 MiB pieces."""
    imp = FileImporter(cid_version=cid_version, keep_blocks=False)
    buf = bytearray(_READ_SIZE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            imp.feed(view[:n])
    return imp.finish()[0]


# -- export --------------------------------------------------------------------------------


def links_of(cid: Cid, block: bytes) -> list[Cid]:
    """The child CIDs of a block, in order (none for raw blocks). Does not verify the hash."""
    if cid.codec == RAW:
        return []
    if cid.codec == DAG_PB:
        return [link.cid for link in decode_node(block).links]
    raise StorageError(f"cannot walk block {cid}: codec {cid.codec_name} is not raw or dag-pb")


class FileTooLarge(StorageError):
    """A file claims more bytes than the caller's limit; ``size`` and ``limit`` say how many."""

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


def human_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it above 1 (``64 GiB``)."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} bytes"


def over_limit(root: Cid, size: int, limit: int) -> FileTooLarge:
    """The error for a file ``root`` that claims ``size`` bytes against ``limit``."""
    return FileTooLarge(
        f"file {root} claims {size} bytes ({human_bytes(size)}), over the"
        f" {human_bytes(limit)} limit for one file ({limit} bytes)", size=size, limit=limit)


def _unixfs_parts(cid: Cid, block: bytes | memoryview) -> tuple[PBNode, bytes, tuple[int, ...]]:
    """Decode a file node: the node, its inline data and its children's sizes (validated:
    one size per link, none empty, adding up to filesize). Link Tsizes are not checked:
    importers other than Kubo's write them differently."""
    if cid.codec != DAG_PB:
        raise StorageError(
            f"block {cid} has codec {cid.codec_name}; a file needs raw or dag-pb"
        )
    node = decode_node(block)
    if node.data is None:
        raise StorageError(f"dag-pb node {cid} carries no UnixFS data")
    u = decode_unixfs(node.data)
    if u.type not in (UNIXFS_FILE, UNIXFS_RAW):
        raise StorageError(f"node {cid} is UnixFS type {u.type}, not a file")
    if len(u.blocksizes) != len(node.links):
        raise StorageError(
            f"node {cid} has {len(node.links)} links but {len(u.blocksizes)} blocksizes"
        )
    if any(s == 0 for s in u.blocksizes):
        raise StorageError(f"node {cid} links to an empty subtree")
    data = u.data or b""
    if u.filesize is not None and u.filesize != len(data) + sum(u.blocksizes):
        raise StorageError(
            f"node {cid} says {u.filesize} bytes but its parts add up to "
            f"{len(data) + sum(u.blocksizes)}"
        )
    return node, data, u.blocksizes


def claimed_size(cid: Cid, block: bytes | memoryview) -> int:
    """The file size a root block claims (a raw block: its length). Does not verify the
    block's hash; a fetch uses it to refuse a file before fetching the rest.

    Raises:
        StorageError: the block is not a UnixFS file node, or its sizes do not add up.
    """
    if cid.codec == RAW:
        return len(block)
    _, data, sizes = _unixfs_parts(cid, block)
    return len(data) + sum(sizes)


class FileExporter:
    """Iterate over a UnixFS file's bytes, fetching blocks with ``get_block(cid)``.

    Blocks are fetched lazily in file order, one at a time, and each is checked against
    its CID before use. Sizes are checked too: a node's content must add up to its
    ``filesize`` and to the size its parent recorded for it, so the bytes produced are
    exactly :attr:`size` (known after the root block, see :meth:`size`).
    ``max_size`` refuses files that claim to be larger (None: no limit, for callers that
    bound the output themselves); the default is ``DEFAULT_MAX_FILE_BYTES``.
    """

    def __init__(
        self,
        root: Cid,
        get_block: Callable[[Cid], bytes],
        *,
        max_size: int | None = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        self.root = root
        self._get = get_block
        self._max_size = max_size
        self._root_block: bytes | None = None

    def _fetch(self, cid: Cid) -> bytes:
        if cid == self.root and self._root_block is not None:
            block, self._root_block = self._root_block, None
            return block
        block = self._get(cid)
        if not cid.verify(block):
            raise StorageError(f"block {cid} does not match its hash: corrupted or forged")
        return block

    def size(self) -> int:
        """The file size the root claims (fetches and verifies only the root block).

        Raises:
            StorageError: the root is not a file, or claims more than ``max_size``.
        """
        if self._root_block is None:
            self._root_block = self._fetch(self.root)
        total = claimed_size(self.root, self._root_block)
        if self._max_size is not None and total > self._max_size:
            raise over_limit(self.root, total, self._max_size)
        return total

    def __iter__(self) -> Iterator[bytes]:
        total = self.size()
        stack: list[tuple[Cid, int, int]] = [(self.root, total, 0)]  # cid, size, depth
        while stack:
            cid, expected, depth = stack.pop()
            block = self._fetch(cid)
            if cid.codec == RAW:
                if len(block) != expected:
                    raise StorageError(
                        f"raw block {cid} is {len(block)} bytes, parent says {expected}"
                    )
                if block:
                    yield block
                continue
            node, data, sizes = _unixfs_parts(cid, block)
            if len(data) + sum(sizes) != expected:
                raise StorageError(
                    f"node {cid} covers {len(data) + sum(sizes)} bytes, parent says {expected}"
                )
            if sizes and depth >= MAX_DEPTH:
                raise StorageError(f"DAG under {self.root} is deeper than {MAX_DEPTH} levels")
            if data:
                yield data
            for link, size in zip(reversed(node.links), reversed(sizes), strict=True):
                stack.append((link.cid, size, depth + 1))


def export_file(
    root: Cid, get_block: Callable[[Cid], bytes], *,
    max_size: int | None = DEFAULT_MAX_FILE_BYTES,
) -> Iterator[bytes]:
    """Yield the bytes of the file rooted at ``root`` in order (see :class:`FileExporter`)."""
    return iter(FileExporter(root, get_block, max_size=max_size))
