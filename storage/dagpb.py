"""Minimal protobuf codec for dag-pb nodes and UnixFS ``Data``, byte-exact with Kubo.

dag-pb (multicodec 0x70) schema, from the IPLD spec::

    message PBLink { optional bytes Hash = 1; optional string Name = 2; optional uint64 Tsize = 3; }
    message PBNode { repeated PBLink Links = 2; optional bytes Data = 1; }

The canonical encoding writes every ``Links`` entry (field 2) *before* ``Data``
(field 1), and inside a link Hash, Name, Tsize in that order. Kubo always writes
``Name`` (as ``""`` for file chunks, i.e. the two bytes ``12 00``) and ``Tsize``.

UnixFS ``Data`` (carried in ``PBNode.Data``), proto2::

    message Data {
      required DataType Type = 1;  // Raw=0 Directory=1 File=2 Metadata=3 Symlink=4 HAMTShard=5
      optional bytes Data = 2;
      optional uint64 filesize = 3;
      repeated uint64 blocksizes = 4;      // not packed
      optional uint64 hashType = 5; optional uint64 fanout = 6;
      optional uint32 mode = 7; optional UnixTime mtime = 8;
    }

Only the fields a file importer/exporter needs are modelled; the decoder skips the
others. Decoding errors raise :class:`teammesh.protocols.errors.StorageError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from .cid import Cid, StorageError, decode_varint, encode_varint

__all__ = [
    "UNIXFS_DIRECTORY",
    "UNIXFS_FILE",
    "UNIXFS_RAW",
    "PBLink",
    "PBNode",
    "UnixFSData",
    "decode_node",
    "decode_unixfs",
    "encode_link",
    "encode_node",
    "encode_unixfs",
]

UNIXFS_RAW: Final = 0
UNIXFS_DIRECTORY: Final = 1
UNIXFS_FILE: Final = 2

_VARINT: Final = 0
_I64: Final = 1
_LEN: Final = 2
_I32: Final = 5


@dataclass(frozen=True, slots=True)
class PBLink:
    """One dag-pb link: the child's CID, its name and the cumulative size of its subtree."""

    cid: Cid
    name: str | None = ""
    tsize: int | None = None


@dataclass(frozen=True, slots=True)
class PBNode:
    """A dag-pb node: ordered links plus an opaque data payload (UnixFS for files)."""

    links: tuple[PBLink, ...] = ()
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class UnixFSData:
    """The subset of UnixFS ``Data`` a file needs."""

    type: int
    data: bytes | None = None
    filesize: int | None = None
    blocksizes: tuple[int, ...] = field(default=())


# -- low-level helpers ---------------------------------------------------------------------


def _key(field_no: int, wire_type: int) -> bytes:
    return encode_varint((field_no << 3) | wire_type)


def _put_bytes(out: bytearray, field_no: int, value: bytes) -> None:
    out += _key(field_no, _LEN)
    out += encode_varint(len(value))
    out += value


def _read_len(buf: memoryview, pos: int) -> tuple[memoryview, int]:
    length, pos = decode_varint(buf, pos)
    end = pos + length
    if end > len(buf):
        raise StorageError(f"protobuf field of {length} bytes runs past the end of the block")
    return buf[pos:end], end


def _skip(buf: memoryview, pos: int, wire_type: int) -> int:
    if wire_type == _VARINT:
        return decode_varint(buf, pos)[1]
    if wire_type == _LEN:
        return _read_len(buf, pos)[1]
    if wire_type in (_I64, _I32):
        end = pos + (8 if wire_type == _I64 else 4)
        if end > len(buf):
            raise StorageError("truncated fixed-size protobuf field")
        return end
    raise StorageError(f"unsupported protobuf wire type {wire_type}")


def _expect(wire_type: int, wanted: int, what: str) -> None:
    if wire_type != wanted:
        raise StorageError(f"{what} has protobuf wire type {wire_type}, expected {wanted}")


# -- dag-pb ------------------------------------------------------------------------------


def encode_link(link: PBLink) -> bytes:
    """Encode one ``PBLink`` message (without its enclosing field key)."""
    out = bytearray()
    _put_bytes(out, 1, link.cid.to_bytes())
    if link.name is not None:
        _put_bytes(out, 2, link.name.encode("utf-8"))
    if link.tsize is not None:
        out += _key(3, _VARINT)
        out += encode_varint(link.tsize)
    return bytes(out)


def encode_node(node: PBNode) -> bytes:
    """Encode a dag-pb node canonically: all links (field 2) first, then data (field 1)."""
    out = bytearray()
    for link in node.links:
        _put_bytes(out, 2, encode_link(link))
    if node.data is not None:
        _put_bytes(out, 1, node.data)
    return bytes(out)


def _decode_link(buf: memoryview) -> PBLink:
    cid: Cid | None = None
    name: str | None = None
    tsize: int | None = None
    pos = 0
    while pos < len(buf):
        key, pos = decode_varint(buf, pos)
        field_no, wire_type = key >> 3, key & 7
        if field_no == 1:
            _expect(wire_type, _LEN, "PBLink.Hash")
            raw, pos = _read_len(buf, pos)
            cid = Cid.from_bytes(raw)
        elif field_no == 2:
            _expect(wire_type, _LEN, "PBLink.Name")
            raw, pos = _read_len(buf, pos)
            try:
                name = str(raw, "utf-8")
            except UnicodeDecodeError:
                raise StorageError("PBLink.Name is not valid UTF-8") from None
        elif field_no == 3:
            _expect(wire_type, _VARINT, "PBLink.Tsize")
            tsize, pos = decode_varint(buf, pos)
        else:
            raise StorageError(f"unknown field {field_no} in a dag-pb link")
    if cid is None:
        raise StorageError("dag-pb link without a Hash")
    return PBLink(cid, name, tsize)


def decode_node(block: bytes | memoryview) -> PBNode:
    """Decode a dag-pb block. Accepts either field order; rejects unknown fields."""
    buf = memoryview(block)
    links: list[PBLink] = []
    data: bytes | None = None
    pos = 0
    while pos < len(buf):
        key, pos = decode_varint(buf, pos)
        field_no, wire_type = key >> 3, key & 7
        if field_no == 2:
            _expect(wire_type, _LEN, "PBNode.Links")
            raw, pos = _read_len(buf, pos)
            links.append(_decode_link(raw))
        elif field_no == 1:
            _expect(wire_type, _LEN, "PBNode.Data")
            if data is not None:
                raise StorageError("dag-pb node with two Data fields")
            raw, pos = _read_len(buf, pos)
            data = bytes(raw)
        else:
            raise StorageError(f"unknown field {field_no} in a dag-pb node")
    return PBNode(tuple(links), data)


# -- UnixFS ------------------------------------------------------------------------------


def encode_unixfs(d: UnixFSData) -> bytes:
    """Encode UnixFS ``Data`` the way go-unixfs does (Type, Data, filesize, blocksizes)."""
    out = bytearray(_key(1, _VARINT))
    out += encode_varint(d.type)
    if d.data:  # go-unixfs leaves Data unset (nil) for internal and empty nodes
        _put_bytes(out, 2, d.data)
    if d.filesize is not None:
        out += _key(3, _VARINT)
        out += encode_varint(d.filesize)
    key4 = _key(4, _VARINT)
    for size in d.blocksizes:
        out += key4
        out += encode_varint(size)
    return bytes(out)


def decode_unixfs(payload: bytes | memoryview) -> UnixFSData:
    """Decode UnixFS ``Data``; ``blocksizes`` may be packed or not; fields 5-8 are skipped."""
    buf = memoryview(payload)
    type_: int | None = None
    data: bytes | None = None
    filesize: int | None = None
    blocksizes: list[int] = []
    pos = 0
    while pos < len(buf):
        key, pos = decode_varint(buf, pos)
        field_no, wire_type = key >> 3, key & 7
        if field_no == 1:
            _expect(wire_type, _VARINT, "UnixFS Type")
            type_, pos = decode_varint(buf, pos)
        elif field_no == 2:
            _expect(wire_type, _LEN, "UnixFS Data")
            raw, pos = _read_len(buf, pos)
            data = bytes(raw)
        elif field_no == 3:
            _expect(wire_type, _VARINT, "UnixFS filesize")
            filesize, pos = decode_varint(buf, pos)
        elif field_no == 4:
            if wire_type == _LEN:  # packed, tolerated
                raw, pos = _read_len(buf, pos)
                sub = 0
                while sub < len(raw):
                    size, sub = decode_varint(raw, sub)
                    blocksizes.append(size)
            else:
                _expect(wire_type, _VARINT, "UnixFS blocksizes")
                size, pos = decode_varint(buf, pos)
                blocksizes.append(size)
        else:
            pos = _skip(buf, pos, wire_type)
    if type_ is None:
        raise StorageError("UnixFS Data without its required Type field")
    return UnixFSData(type_, data, filesize, tuple(blocksizes))
