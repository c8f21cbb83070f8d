"""Framing and the msgpack envelope shared by every teammesh protocol.

Invariants:
- A frame is an unsigned LEB128 varint length followed by that many bytes of msgpack.
- Every message is a msgpack map with string keys, a ``t`` (type) string and a ``v``
  (version) integer. Unknown versions are rejected here; each protocol's handler decides
  what an unknown ``t`` means (ignored on the tasks stream, rejected elsewhere).
- Size limits are enforced before any allocation proportional to the claimed size.
- What one message may allocate is bounded too, not only its byte size: msgpack turns one
  byte into a 64-byte empty dict, so ``unpack`` caps the maps and lists (one per
  ``CONTAINER_BYTES`` bytes of the limit), the items they hold (one per ``ELEMENT_BYTES``)
  and the nesting depth (``MAX_DEPTH``), and refuses with MalformedMessage past any of them.
- A decoded message holds only plain data: None, bool, int, float, str, bytes, list and
  dict. msgpack extension types are refused (no teammesh message uses them), and msgpack
  timestamps decode to float seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import msgpack

from .errors import FrameTooLarge, LocalProtocolError, MalformedMessage

WIRE_VERSION = 1
MAX_FRAME_BYTES = 8 * 1024 * 1024  # direct streams; inline task data rides here
MAX_GOSSIP_BYTES = 64 * 1024  # capability ads, roster entries, open calls
_MAX_VARINT_BYTES = 10
MAX_DEPTH = 32  # maps and lists nested in a message, the message map itself included
CONTAINER_BYTES = 32  # one map or list allowed per this many bytes of the size limit
ELEMENT_BYTES = 8  # one item (list entry or map pair) per this many bytes of the limit
_SMALL_MESSAGE_BYTES = 16 * 1024  # below this, count header bytes instead of wrapping

Message = dict[str, Any]


def encode_varint(n: int) -> bytes:
    """Unsigned LEB128 (protobuf, multiformats); the one varint encoder of the project."""
    if 0 <= n < 0x80:
        return bytes((n,))
    if n < 0:
        raise LocalProtocolError("varint must be non-negative")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf: bytes | bytearray | memoryview, pos: int = 0, end: int | None = None,
                *, max_bytes: int = _MAX_VARINT_BYTES, minimal: bool = False) -> tuple[int, int]:
    """Decode the unsigned varint at ``buf[pos:end]``; return ``(value, position after it)``.

    The one varint reader (frames, Bitswap, CIDs and dag-pb): raises MalformedMessage if the
    data ends inside the number, if it runs over ``max_bytes``, or (``minimal``, as
    multiformats require) if it has a redundant trailing zero byte."""
    if end is None:
        end = len(buf)
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise MalformedMessage("truncated varint: the data ends in the middle of a number")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            if minimal and b == 0 and pos - start > 1:
                raise MalformedMessage("non-minimal varint: trailing zero byte")
            return result, pos
        shift += 7
        if pos - start >= max_bytes:
            raise MalformedMessage(f"varint longer than {max_bytes} bytes")


def decode_varint(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int] | None:
    """Return (value, next_pos), or None if the buffer ends inside the varint (a stream
    decoder waits for more bytes then)."""
    try:
        return read_varint(buf, pos)
    except MalformedMessage:
        if len(buf) - pos < _MAX_VARINT_BYTES:
            return None
        raise


def pack(msg: Mapping[str, Any]) -> bytes:
    """Serialise one message map (no frame)."""
    try:
        return msgpack.packb(msg, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode message: {exc}") from exc


class _Budget:
    """Counts the maps and lists msgpack builds and stops it at the first one over budget.

    msgpack calls the hooks as each container closes, so at most one container's items
    (``max_array_len``/``max_map_len`` bound those) are allocated beyond the budget."""

    __slots__ = ("containers", "elements", "limit_bytes")

    def __init__(self, containers: int, elements: int, limit_bytes: int) -> None:
        self.containers = containers
        self.elements = elements
        self.limit_bytes = limit_bytes

    def hook(self, obj: Any) -> Any:
        self.containers -= 1
        self.elements -= len(obj)
        if self.containers < 0 or self.elements < 0:
            self._refuse()
        return obj

    def map_hook(self, obj: dict[Any, Any]) -> dict[Any, Any]:
        """``hook``, and every key a string (``_str_keys_hook``)."""
        return _str_keys_hook(self.hook(obj))

    def _refuse(self) -> NoReturn:
        what = "maps and lists" if self.containers < 0 else "items"
        raise MalformedMessage(
            f"message holds too many {what} for a {self.limit_bytes}-byte limit "
            f"(at most {self.limit_bytes // CONTAINER_BYTES} maps and lists and "
            f"{self.limit_bytes // ELEMENT_BYTES} items); send large data as a file by CID")


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise MalformedMessage(f"message holds a msgpack extension type ({code}); teammesh "
                           "messages hold only plain data")


def _msgpack_stack_depth() -> int:
    """The nesting depth msgpack's C decoder accepts (1024 in msgpack 1.x)."""
    lo, hi = 1, 4096
    while lo < hi:  # the largest n for which n nested arrays decode
        mid = (lo + hi + 1) // 2
        try:
            msgpack.unpackb(b"\x91" * mid + b"\xc0")
        except msgpack.StackError:
            hi = mid - 1
        else:
            lo = mid
    return lo


# msgpack has no depth option, but its decoder stops at a fixed stack depth: a message
# wrapped in (stack - MAX_DEPTH) one-item arrays decodes only if it nests at most MAX_DEPTH
# deep, checked in C at no cost per item. The wrapping is undone after decoding.
_STACK_DEPTH = _msgpack_stack_depth()
_WRAP = _STACK_DEPTH - MAX_DEPTH
_WRAP_PREFIX = b"\x91" * _WRAP
# Every map or list starts with one of these bytes (fixmap, fixarray, map/array 16/32), so
# a message with at most MAX_DEPTH of them cannot nest deeper: small messages skip the wrap.
_HEADER_BYTES = bytes(range(0x80, 0xA0)) + bytes((0xDC, 0xDD, 0xDE, 0xDF))
_HEADER_TABLE = bytes(1 if b in _HEADER_BYTES else 0 for b in range(256))
_WALK_MAX_HEADERS = 512  # below this count of header-like bytes, walk rather than wrap
_CONTAINERS = (dict, list)


def _depth_at_most(obj: Any, limit: int) -> bool:
    """Does ``obj`` nest maps and lists at most ``limit`` deep (itself counted)? Level by
    level, without recursion (msgpack's own stack bounds the depth to ~1,000)."""
    level, depth = [obj], 1
    while True:
        nested: list[Any] = []
        for item in level:
            values = item.values() if type(item) is dict else item
            nested.extend([v for v in values if type(v) in _CONTAINERS])
        if not nested:
            return True
        depth += 1
        if depth > limit:
            return False
        level = nested


def unpack(data: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Parse one message map, rejecting anything that is not a well-formed envelope.

    Besides ``max_bytes`` itself, the message may hold at most ``max_bytes //
    CONTAINER_BYTES`` maps and lists, ``max_bytes // ELEMENT_BYTES`` items in all, and nest
    ``MAX_DEPTH`` deep; past any limit it raises MalformedMessage before msgpack allocates
    much more than the limit allows (no hooks run when the message is too short to reach
    them, which keeps small messages at msgpack's own speed).

    Raises:
        FrameTooLarge: ``data`` is longer than ``max_bytes``.
        MalformedMessage: not msgpack, too many or too deep containers, or not an envelope.
    """
    if len(data) > max_bytes:
        raise FrameTooLarge(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    max_containers = max(1024, max_bytes // CONTAINER_BYTES)
    max_elements = max(4096, max_bytes // ELEMENT_BYTES)
    headers = data.translate(_HEADER_TABLE).count(1) if MAX_DEPTH < len(data) else 0
    # A small message with more header-like bytes than MAX_DEPTH (most result batches:
    # digests and signatures hold such bytes) is decoded as it is and its depth measured
    # after, by a walk over at most _WALK_MAX_HEADERS containers: wrapping costs ~1,000
    # nested lists, several times the decoding of the message itself.
    wrap = len(data) > _SMALL_MESSAGE_BYTES or headers > _WALK_MAX_HEADERS
    walk = not wrap and headers > MAX_DEPTH
    # strict_map_key admits bytes keys too; code reading a map expects str ones. A bytes
    # key needs a bin header (0xc4-0xc6), so maps are checked only when one may be there.
    keys = b"\xc4" in data or b"\xc5" in data or b"\xc6" in data
    hook: Callable[[Any], Any] | None = None
    map_hook: Callable[[Any], Any] | None = _str_keys_hook if keys else None
    if len(data) > max_containers:  # each map or list takes at least one byte
        budget = _Budget(max_containers + _WRAP * wrap, max_elements + _WRAP * wrap,
                         max_bytes)
        hook = budget.hook
        map_hook = budget.map_hook if keys else hook
    try:
        obj = msgpack.unpackb(
            _WRAP_PREFIX + data if wrap else data,
            raw=False,
            strict_map_key=True,
            list_hook=hook,
            object_hook=map_hook,
            max_array_len=max_elements,
            max_map_len=max_elements,
            ext_hook=_refuse_ext,
            timestamp=1,  # float seconds: a Timestamp object would reach code expecting data
        )
    except msgpack.StackError as exc:
        raise MalformedMessage(f"message nests maps and lists deeper than {MAX_DEPTH} "
                               "levels") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # TypeError: an unhashable map key (a map used as a key) in hostile input
        raise MalformedMessage(f"not a msgpack message: {exc}") from exc
    if wrap:
        for _ in range(_WRAP):
            obj = obj[0]
    elif walk and not _depth_at_most(obj, MAX_DEPTH):
        raise MalformedMessage(f"message nests maps and lists deeper than {MAX_DEPTH} "
                               "levels")
    if not isinstance(obj, dict):
        raise MalformedMessage("message is not a map")
    if not isinstance(obj.get("t"), str):
        raise MalformedMessage("message has no type field 't'")
    v = obj.get("v")
    if type(v) is not int or v != WIRE_VERSION:  # True and 1.0 are not versions
        raise MalformedMessage(f"unsupported message version {obj.get('v')!r}")
    return obj


def _str_keys_hook(obj: dict[Any, Any]) -> dict[Any, Any]:
    """msgpack's ``object_hook``: refuse a map with a key that is not a string. In C per
    map (``str.join`` raises at the first key that is not a str), where a walk over the
    decoded message cost as much as decoding it."""
    try:
        "".join(obj)
    except TypeError:
        raise MalformedMessage("a map key is not a string") from None
    return obj


def frame(payload: bytes) -> bytes:
    return encode_varint(len(payload)) + payload


def frame_message(msg: Mapping[str, Any]) -> bytes:
    return frame(pack(msg))


class FrameDecoder:
    """Incremental varint-length-prefixed frame splitter: feed bytes, get whole frames."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames: list[bytes] = []
        pos = 0
        while True:
            hdr = decode_varint(self._buf, pos)
            if hdr is None:
                break
            size, start = hdr
            if size > self._max:
                raise FrameTooLarge(f"frame of {size} bytes exceeds the {self._max}-byte limit")
            end = start + size
            if end > len(self._buf):
                break
            frames.append(bytes(self._buf[start:end]))
            pos = end
        if pos:
            del self._buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)


# --- field access: every field error names the field -------------------------------------


def field_str(m: Mapping[str, Any], key: str, *, max_len: int = 4096) -> str:
    v = m.get(key)
    if not isinstance(v, str):
        raise MalformedMessage(f"field {key!r} must be a string")
    if len(v) > max_len:
        raise MalformedMessage(f"field {key!r} longer than {max_len}")
    return v


def field_int(m: Mapping[str, Any], key: str) -> int:
    v = m.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise MalformedMessage(f"field {key!r} must be an integer")
    return v


def field_float(m: Mapping[str, Any], key: str) -> float:
    v = m.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise MalformedMessage(f"field {key!r} must be a number")
    return float(v)


def field_bytes(m: Mapping[str, Any], key: str, *, max_len: int = MAX_FRAME_BYTES) -> bytes:
    v = m.get(key)
    if not isinstance(v, bytes):
        raise MalformedMessage(f"field {key!r} must be bytes")
    if len(v) > max_len:
        raise MalformedMessage(f"field {key!r} longer than {max_len}")
    return v


def field_list(m: Mapping[str, Any], key: str, *, max_len: int = 10_000) -> list[Any]:
    v = m.get(key)
    if not isinstance(v, list):
        raise MalformedMessage(f"field {key!r} must be a list")
    if len(v) > max_len:
        raise MalformedMessage(f"field {key!r} has more than {max_len} items")
    return v


def field_map(m: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = m.get(key)
    if not isinstance(v, dict):
        raise MalformedMessage(f"field {key!r} must be a map")
    return v


def field_str_list(m: Mapping[str, Any], key: str, *, max_len: int = 1000) -> list[str]:
    items = field_list(m, key, max_len=max_len)
    if not all(isinstance(x, str) for x in items):
        raise MalformedMessage(f"field {key!r} must be a list of strings")
    return items
