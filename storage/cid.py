"""Content identifiers: CIDv0/CIDv1, multihash and multibase, encoded and decoded.

A CID names a block by its hash. We produce what Kubo produces:

* CIDv1 (``ipfs add --cid-version=1``): ``<varint 1><varint codec><multihash>``, printed
  in multibase base32 lowercase, i.e. ``"b" + base32(...)`` without padding. Raw leaves
  (codec ``raw`` = 0x55) print as ``bafk...``, dag-pb nodes (0x70) as ``bafy...``.
* CIDv0 (Kubo's historical default): just the sha2-256 multihash of a dag-pb block,
  printed in base58btc with no multibase prefix (``Qm...``).

A multihash is ``<varint hash code><varint digest length><digest>``. Only sha2-256 is
produced; ``verify`` also understands sha2-512, blake2b-256 and identity so that CIDs
made elsewhere can at least be checked.

Every function here is pure. Malformed input raises
:class:`teammesh.protocols.errors.StorageError` naming what is wrong.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Final

import base58
from teammesh.protocols.errors import MalformedMessage, StorageError
from teammesh.protocols.wire import encode_varint, read_varint

__all__ = [
    "BLAKE2B_256",
    "DAG_PB",
    "IDENTITY",
    "RAW",
    "SHA2_256",
    "SHA2_512",
    "Cid",
    "StorageError",
    "decode_varint",
    "encode_varint",
    "multihash_sha256",
]

# Multicodec table entries we use.
RAW: Final = 0x55
DAG_PB: Final = 0x70
IDENTITY: Final = 0x00
SHA2_256: Final = 0x12
SHA2_512: Final = 0x13
BLAKE2B_256: Final = 0xB220

_CODEC_NAMES: Final[dict[int, str]] = {RAW: "raw", DAG_PB: "dag-pb"}
_MAX_VARINT_BYTES: Final = 9  # unsigned-varint spec: at most 63 bits
_MAX_CID_STRING: Final = 4096


def decode_varint(buf: bytes | memoryview, pos: int = 0) -> tuple[int, int]:
    """Decode an unsigned varint at ``buf[pos:]``; return ``(value, position after it)``.

    Rejects truncated, non-minimal and over-long (more than 9 bytes, the multiformats
    limit) varints with ``StorageError``.
    """
    try:
        return read_varint(buf, pos, max_bytes=_MAX_VARINT_BYTES, minimal=True)
    except MalformedMessage as exc:
        raise StorageError(str(exc)) from None


def multihash_sha256(data: bytes | memoryview) -> bytes:
    """The sha2-256 multihash of ``data``: ``0x12 0x20 <32-byte digest>``."""
    return b"\x12\x20" + hashlib.sha256(data).digest()


def _digest(code: int, data: bytes | memoryview) -> bytes | None:
    """Hash ``data`` with the multihash function ``code``; ``None`` if unsupported."""
    if code == SHA2_256:
        return hashlib.sha256(data).digest()
    if code == SHA2_512:
        return hashlib.sha512(data).digest()
    if code == BLAKE2B_256:
        return hashlib.blake2b(data, digest_size=32).digest()
    return None


def _split_multihash(mh: bytes) -> tuple[int, int, int]:
    """Validate a multihash; return ``(hash code, digest length, digest offset)``."""
    code, pos = decode_varint(mh, 0)
    length, pos = decode_varint(mh, pos)
    if len(mh) - pos != length:
        raise StorageError(
            f"multihash digest length says {length} bytes but {len(mh) - pos} follow"
        )
    return code, length, pos


def _b32encode(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _b32decode(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        return base64.b32decode(padded)
    except ValueError as e:
        raise StorageError(f"invalid base32 in CID {text[:16]!r}...: {e}") from None


@dataclass(frozen=True, slots=True)
class Cid:
    """A content identifier.

    ``version`` is 0 or 1, ``codec`` the multicodec of the block (``RAW``, ``DAG_PB``...),
    ``multihash`` the full multihash bytes (hash code, length and digest).
    Instances are immutable, hashable and compare by value; a CIDv0 and the CIDv1 of the
    same dag-pb block are different values (their strings differ too).
    """

    version: int
    codec: int
    multihash: bytes

    def __post_init__(self) -> None:
        if self.version not in (0, 1):
            raise StorageError(f"unsupported CID version {self.version}; only 0 and 1 exist")
        if self.codec < 0:
            raise StorageError(f"invalid CID codec {self.codec}")
        code, length, _ = _split_multihash(self.multihash)
        if self.version == 0 and (self.codec != DAG_PB or code != SHA2_256 or length != 32):
            raise StorageError("a CIDv0 must be a dag-pb block named by a 32-byte sha2-256 hash")

    # -- construction -------------------------------------------------------------------

    @classmethod
    def of_block(cls, codec: int, block: bytes | memoryview, version: int = 1) -> Cid:
        """The sha2-256 CID of ``block`` with the given codec (v0 only for dag-pb)."""
        return cls(version, codec, multihash_sha256(block))

    @classmethod
    def from_sha256(cls, codec: int, digest: bytes, version: int = 1) -> Cid:
        """Build a CID from an already-computed 32-byte sha2-256 digest."""
        if len(digest) != 32:
            raise StorageError(f"a sha2-256 digest is 32 bytes, got {len(digest)}")
        return cls(version, codec, b"\x12\x20" + digest)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Cid:
        """Decode a binary CID (as found in dag-pb links or on the wire); must be exact."""
        raw = bytes(data)
        if len(raw) == 34 and raw[0] == 0x12 and raw[1] == 0x20:
            return cls(0, DAG_PB, raw)
        if not raw:
            raise StorageError("empty binary CID")
        version, pos = decode_varint(raw, 0)
        if version != 1:
            raise StorageError(f"unsupported binary CID version {version}")
        codec, pos = decode_varint(raw, pos)
        return cls(1, codec, raw[pos:])

    @classmethod
    def parse(cls, text: str) -> Cid:
        """Parse a CID string: ``Qm...`` (v0) or multibase v1 (``b``/``B`` base32,
        ``z`` base58btc, ``f``/``F`` base16, ``u`` base64url)."""
        text = text.strip()
        if not text:
            raise StorageError("empty CID string")
        if len(text) > _MAX_CID_STRING:
            raise StorageError(f"CID string of {len(text)} characters is too long")
        if len(text) == 46 and text.startswith("Qm"):
            try:
                raw = base58.b58decode(text)
            except ValueError as e:
                raise StorageError(f"invalid base58 in CIDv0 {text!r}: {e}") from None
            return cls.from_bytes(raw)
        prefix, body = text[0], text[1:]
        try:
            if prefix in "bB":
                raw = _b32decode(body)
            elif prefix == "z":
                raw = base58.b58decode(body)
            elif prefix in "fF":
                raw = bytes.fromhex(body)
            elif prefix == "u":
                raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            else:
                raise StorageError(
                    f"unknown multibase prefix {prefix!r} in CID {text[:16]!r}; "
                    "expected 'b' (base32) or a 'Qm...' CIDv0"
                )
        except ValueError as e:
            raise StorageError(f"invalid CID string {text[:16]!r}...: {e}") from None
        cid = cls.from_bytes(raw)
        if cid.version == 0:
            raise StorageError("a CIDv0 must be written in bare base58 ('Qm...')")
        return cid

    # -- encoding -----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The binary form: the bare multihash for v0, version+codec+multihash for v1."""
        if self.version == 0:
            return self.multihash
        return encode_varint(1) + encode_varint(self.codec) + self.multihash

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def __str__(self) -> str:
        if self.version == 0:
            return str(base58.b58encode(self.multihash).decode("ascii"))
        return "b" + _b32encode(self.to_bytes())

    def __repr__(self) -> str:
        return f"Cid({str(self)!r})"

    def to_v1(self) -> Cid:
        """The same block named by a CIDv1 (identity for v1 CIDs)."""
        return self if self.version == 1 else Cid(1, self.codec, self.multihash)

    # -- inspection ---------------------------------------------------------------------

    @property
    def hash_code(self) -> int:
        """The multihash function code (0x12 for sha2-256)."""
        return decode_varint(self.multihash, 0)[0]

    @property
    def digest(self) -> bytes:
        """The bare digest bytes, without the multihash header."""
        return self.multihash[_split_multihash(self.multihash)[2] :]

    @property
    def codec_name(self) -> str:
        """A human name for the codec (``"raw"``, ``"dag-pb"`` or hex)."""
        return _CODEC_NAMES.get(self.codec, hex(self.codec))

    def verify(self, block: bytes | memoryview) -> bool:
        """True when ``block`` hashes to this CID's digest (False for unknown hash codes)."""
        code, length, pos = _split_multihash(self.multihash)
        if code == SHA2_256 and length == 32:  # fast path
            return hashlib.sha256(block).digest() == self.multihash[2:]
        if code == IDENTITY:
            return bytes(block) == self.multihash[pos:]
        actual = _digest(code, block)
        return actual is not None and actual[:length] == self.multihash[pos:]
