"""Stream I/O over py-libp2p 0.8.1's yamux-over-Noise connections, without its overhead.

A small message cost a py-libp2p host about 150 µs of CPU each way (a ping-pong between
two processes: ~300 µs per side per round trip; docs/BENCHMARKS.md, "Session 5"). Each
frame went through layers that each take a trio lock (one pass through trio's scheduler
apiece) and format debug f-strings whether or not debug logging is on: on the way out
``NetStream``'s state lock, the yamux stream's read-write and window locks, the
connection's write lock and the TCP stream's write lock; on the way in two ``recv``
calls per Noise message (length, then body) under the TCP read lock, two
``read_exactly`` calls per frame through ``SecureSession``, ``streams_lock`` in the
connection's reader, then ``NetStream``'s state lock, ``read_stream`` (``streams_lock``
again) and the window lock in the application's ``read``.

What this module does instead, leaving py-libp2p's state model (``streams``,
``stream_buffers``, ``stream_events``, windows, the Noise cipher states) exactly as its
own code keeps it, and every unusual case to its own code:

* A ``_Channel`` owns the Noise-over-TCP byte stream of a yamux connection once the
  connection's reader starts (nothing else reads it from then on): it reads 64 KiB at a
  time and decrypts every whole Noise message in what arrived; it encrypts and sends a
  frame with one ``send_all`` under the connection's write lock.
* ``_FrameFilter`` sits between ``Yamux.handle_incoming`` and that channel and delivers
  plain DATA frames (no flags, a known stream) itself, the way ``handle_incoming`` does;
  every other frame (SYN, ACK, FIN, RST, window updates, pings, GO_AWAY, oversized or
  unknown-stream data) goes to py-libp2p's code unchanged.
* ``read_stream`` / ``write_stream`` take and put bytes on an open yamux stream
  directly; closed, reset, failing or window-starved streams take py-libp2p's path,
  which waits or raises what it always raised.
* WINDOW_UPDATEs go out once half the window is consumed, as go-yamux does (py-libp2p
  answered every read with one), and every stream's window is 4 MiB.
"""

from __future__ import annotations

import struct
from typing import Any

import trio
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError, IOException
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.network.stream.net_stream import NetStream, StreamState
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH, NoiseTransportReadWriter
from libp2p.stream_muxer.yamux import yamux as _yamux
from libp2p.stream_muxer.yamux.yamux import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_WINDOW_SIZE,
    TYPE_DATA,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
)

# every stream's receive window grows to this (go-yamux grows to 16 MiB): bulk Bitswap
# transfers stay clear of py-libp2p's 10 ms poll for an empty window, and only an
# authenticated member can fill it
YAMUX_WINDOW_BYTES = 4 * 1024 * 1024

_HEADER = struct.Struct(YAMUX_HEADER_FORMAT)
# one yamux frame per Noise transport message (65535 bytes with a 16-byte tag)
_MAX_DATA = min(MAX_MESSAGE_SIZE, MAX_PLAINTEXT_LENGTH) - HEADER_SIZE
_READABLE = (StreamState.OPEN, StreamState.CLOSE_WRITE)
_NOT_WRITABLE = (StreamState.ERROR, StreamState.RESET, StreamState.CLOSE_WRITE,
                 StreamState.CLOSE_BOTH)
_RECEIVE_BYTES = 65536

_YAMUX_MODULE: Any = _yamux  # its read_exactly is an import we replace, not an export
_ORIGINAL_READ_EXACTLY = _YAMUX_MODULE.read_exactly
_ORIGINAL_HANDLE_INCOMING = Yamux.handle_incoming
_ORIGINAL_NETSTREAM_WRITE = NetStream.write


class _Channel:
    """The Noise transport messages of one connection, straight over its TCP socket."""

    __slots__ = ("noise", "raw", "tcp")

    def __init__(self, noise: Any, tcp: trio.SocketStream) -> None:
        self.noise = noise
        self.tcp = tcp
        self.raw = bytearray()

    @staticmethod
    def attach(session: Any) -> _Channel | None:
        """A channel for ``session`` if it is Noise over TCP with nothing read ahead."""
        noise = getattr(session, "conn", None)
        if type(noise) is not NoiseTransportReadWriter:
            return None
        raw = getattr(noise.read_writer, "read_write_closer", None)
        if type(raw) is not RawConnection or type(raw.stream) is not TrioTCPStream:
            return None
        if raw.stream.read_lock.locked() or session.low_watermark != session.high_watermark:
            return None
        return _Channel(noise, raw.stream.stream)

    async def receive(self) -> bytes:
        """The plaintext of every whole Noise message that has arrived; b"" at the end."""
        out = bytearray()
        raw = self.raw
        while True:
            pos = 0
            while len(raw) - pos >= 2:
                end = pos + 2 + int.from_bytes(raw[pos:pos + 2], "big")
                if end > len(raw):
                    break
                out += self.noise.decrypt(bytes(raw[pos + 2:end]))
                pos = end
            del raw[:pos]
            if out:
                return bytes(out)
            try:
                data = await self.tcp.receive_some(_RECEIVE_BYTES)
            except trio.BrokenResourceError as exc:  # as py-libp2p's TrioTCPStream.read
                raise ConnectionClosedError(f"TCP connection reset by remote peer: {exc}",
                                            transport="tcp") from exc
            except trio.ClosedResourceError:
                return b""
            if not data:
                return b""
            raw += data

    async def send(self, data: bytes) -> None:
        """Encrypt and send ``data``; the caller holds the connection's write lock."""
        parts: list[bytes] = []
        for pos in range(0, len(data), MAX_PLAINTEXT_LENGTH):
            sealed = self.noise.encrypt(data[pos:pos + MAX_PLAINTEXT_LENGTH])
            parts += (len(sealed).to_bytes(2, "big"), sealed)
        try:
            await self.tcp.send_all(b"".join(parts))
        except trio.BrokenResourceError as exc:  # as py-libp2p's TrioTCPStream.write
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {exc}",
                                        transport="tcp") from exc
        except trio.ClosedResourceError:
            return


class _FrameFilter:
    """What ``Yamux.handle_incoming`` reads: the frames it still has to handle."""

    __slots__ = ("buf", "channel", "mux", "owed", "session")

    def __init__(self, mux: Any, session: Any, channel: _Channel | None) -> None:
        self.mux = mux
        self.session = session
        self.channel = channel
        self.buf = bytearray()
        self.owed = 0  # body bytes of a frame whose header went to py-libp2p

    async def _fill(self, need: int) -> None:
        while len(self.buf) < need:
            if self.channel is not None:
                data = await self.channel.receive()
            else:  # SecureSession.read(None): its buffered rest, else one Noise message
                data = await self.session.read(None)
            if not data:
                raise IncompleteReadError("connection closed", need, len(self.buf))
            self.buf += data

    def _take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_exactly(self, n: int) -> bytes:
        if self.owed or n != HEADER_SIZE:
            await self._fill(n)
            self.owed = max(0, self.owed - n)
            return self._take(n)
        mux = self.mux
        while True:
            await self._fill(HEADER_SIZE)
            _, typ, flags, sid, length = _HEADER.unpack_from(self.buf)
            if typ == TYPE_DATA and not flags and length <= MAX_WINDOW_SIZE:
                end = HEADER_SIZE + length
                if len(self.buf) < end:
                    # py-libp2p bounds a frame body's arrival the same way
                    with trio.fail_after(_YAMUX_MODULE._yamux_data_read_timeout()):
                        await self._fill(end)
                stream = mux.streams.get(sid)
                buffer = mux.stream_buffers.get(sid)
                event = mux.stream_events.get(sid)
                if stream is not None and buffer is not None and event is not None:
                    buffer += memoryview(self.buf)[HEADER_SIZE:end]
                    stream.recv_window = max(0, stream.recv_window - length)
                    event.set()
                    del self.buf[:end]
                    continue
            self.owed = length if typ == TYPE_DATA else 0
            return self._take(HEADER_SIZE)


async def _read_exactly(reader: Any, n: int, *args: Any) -> bytes:
    frames: _FrameFilter | None = getattr(reader, "_teammesh_frames", None)
    if frames is None:
        data: bytes = await _ORIGINAL_READ_EXACTLY(reader, n, *args)
        return data
    return await frames.read_exactly(n)


async def _handle_incoming(self: Any) -> None:
    session = self.secured_conn
    channel = _Channel.attach(session)
    session._teammesh_frames = _FrameFilter(self, session, channel)
    await _ORIGINAL_HANDLE_INCOMING(self)


async def _write_frame(self: Any, data: bytes) -> None:
    # The library's version formats a debug line per frame and yields once more after
    # the write; an uncontended lock is taken without a pass through the scheduler.
    lock = self._write_lock
    if lock.locked():
        await lock.acquire()
    else:
        lock.acquire_nowait()
    try:
        frames: _FrameFilter | None = getattr(self.secured_conn, "_teammesh_frames", None)
        if frames is not None and frames.channel is not None:
            await frames.channel.send(data)
        else:
            await self.secured_conn.write(data)
    finally:
        lock.release()


def _window_credit(ms: Any) -> int:
    """The WINDOW_UPDATE a yamux stream owes its peer now: 0 until half its window (grown
    to ``YAMUX_WINDOW_BYTES``) is consumed, as go-yamux does. py-libp2p 0.8.1 sent one
    after every read that left any slack (its "partial slack" branch): a second Noise
    message and send() per task message."""
    target = max(ms.target_recv_window, YAMUX_WINDOW_BYTES)
    delta: int = target - (ms.recv_window + len(ms.conn.stream_buffers.get(ms.stream_id, b"")))
    return delta if delta > 0 and delta >= target // 2 else 0


async def _update_window(self: Any, *, bytes_read: int = 0) -> None:
    async with self.window_lock:
        self.target_recv_window = max(self.target_recv_window, YAMUX_WINDOW_BYTES)
        delta = _window_credit(self)
        if not delta:
            return
        self.recv_window += delta
    await self.send_window_update(delta, skip_lock=True)


async def _noise_read_msg(self: Any, prefix_encoded: bool = False) -> bytes:
    # as the library's (handshake and non-yamux use), without two debug lines per message
    data = await self.read_writer.read_msg()
    plain: bytes = self.decrypt(data[len(self.prefix):] if prefix_encoded else data)
    return plain


async def read_stream(s: NetStream, n: int) -> bytes:
    """Up to ``n`` bytes from a libp2p stream; b"" at its end."""
    ms = s.muxed_stream
    if type(ms) is YamuxStream and n > 0:
        conn = ms.conn
        sid = ms.stream_id
        while s._state in _READABLE and not (ms.recv_closed or ms.closed
                                             or ms.reset_received):
            buffer = conn.stream_buffers.get(sid)
            event = conn.stream_events.get(sid)
            if buffer is None or event is None or conn.event_shutting_down.is_set():
                break
            if buffer:
                data = bytes(buffer[:n])
                del buffer[:n]
                # only await the window lock when there is a window to grow or credit
                if ms.target_recv_window < YAMUX_WINDOW_BYTES or _window_credit(ms):
                    await ms._auto_tune_and_send_window_update(bytes_read=len(data))
                return data
            await event.wait()
            if conn.stream_events.get(sid) is event:
                conn.stream_events[sid] = trio.Event()
    try:
        return bytes(await s.read(n))
    except StreamEOF:
        return b""


async def write_stream(s: Any, data: bytes) -> None:
    """Write on a NetStream, straight to the connection writer while the window allows.

    Check and window debit have no await between them, so they are atomic under trio;
    frames reach ``_write_frame`` (FIFO lock) in the order their writers got there, as
    on py-libp2p's path. Its 64 KiB frames were 12 bytes too big for one Noise message,
    so every bulk frame went out as two; ours fit.
    """
    ms = getattr(s, "muxed_stream", None)
    if type(ms) is not YamuxStream:
        await _ORIGINAL_NETSTREAM_WRITE(s, data)
        return
    view = memoryview(data)
    pos, total = 0, len(data)
    while pos < total:
        n = min(total - pos, _MAX_DATA)
        if n > ms.send_window or s._state in _NOT_WRITABLE or ms.send_closed or ms.closed:
            await _ORIGINAL_NETSTREAM_WRITE(s, bytes(view[pos:]))  # waits, or raises when closed
            return
        ms.send_window -= n
        try:
            await ms.conn._write_frame(_HEADER.pack(0, 0, 0, ms.stream_id, n)
                                       + view[pos:pos + n])
        except IOException as exc:
            raise StreamError(f"stream write failed: {exc}") from exc
        pos += n


async def _netstream_write(self: Any, data: bytes) -> None:
    await write_stream(self, data)


def install() -> None:
    """Patch py-libp2p's classes (once per process); py-libp2p's own users (gossipsub,
    identify) take the same paths."""
    if _YAMUX_MODULE.read_exactly is _read_exactly:
        return
    _YAMUX_MODULE.read_exactly = _read_exactly
    Yamux.handle_incoming = _handle_incoming  # type: ignore[method-assign]
    Yamux._write_frame = _write_frame  # type: ignore[method-assign]
    YamuxStream._auto_tune_and_send_window_update = _update_window  # type: ignore[method-assign]
    NoiseTransportReadWriter.read_msg = _noise_read_msg  # type: ignore[method-assign]
    NetStream.write = _netstream_write  # type: ignore[method-assign]
