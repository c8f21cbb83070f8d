"""node/p2p/yamux_io.py: streams over our lean yamux-over-Noise path carry every byte, in order,
concurrently, and end the way py-libp2p's did (EOF after close_write, an error or EOF
after a reset). Interop with another implementation: js-libp2p (Helia) and Kubo in
tests/test_bitswap.py and tests/test_kubo.py talk to the same code."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from teammesh.node.p2p.host import STREAM_ERRORS, MeshHost, Stream, open_host

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
ECHO = "/test/echo/1"
SIZES = [1, 12, 4096, 65_511, 65_536, 200_000, 1 << 20]


@asynccontextmanager
async def two_hosts() -> AsyncIterator[tuple[MeshHost, MeshHost, str]]:
    async with open_host(os.urandom(32), [LOOPBACK], peer_gate=lambda p: True,
                         stream_gate=lambda p, proto: True, gossip=False) as server, \
            open_host(os.urandom(32), [LOOPBACK], peer_gate=lambda p: True,
                      stream_gate=lambda p, proto: True, gossip=False) as client:

        async def echo(stream: Stream) -> None:
            while data := await stream.read():
                await stream.write(data)
            await stream.close_write()

        server.set_handler(ECHO, echo)
        peer = await client.connect(server.addrs[0])
        yield server, client, peer


def _channel_in_use(host: MeshHost, peer: str) -> bool:
    from libp2p.peer.id import ID

    conns = host._host.get_network().connections.get(ID.from_base58(peer))
    conns = conns if isinstance(conns, list) else [conns]
    frames = [getattr(c.muxed_conn.secured_conn, "_teammesh_frames", None) for c in conns]
    return all(f is not None and f.channel is not None for f in frames)


async def _read_exactly(stream: Stream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await stream.read()
        assert data, f"stream ended after {len(out)} of {n} bytes"
        out += data
    return bytes(out)


async def test_concurrent_streams_echo_every_size_intact() -> None:
    async with two_hosts() as (_, client, peer):
        digests: dict[int, list[tuple[str, str]]] = {}

        async def one(i: int) -> None:
            stream = await client.open_stream(peer, ECHO)
            got = []
            for size in SIZES:
                data = os.urandom(size)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stream.write, data)
                    back = await _read_exactly(stream, size)
                got.append((hashlib.sha256(data).hexdigest(), hashlib.sha256(back).hexdigest()))
            await stream.close_write()
            assert await stream.read() == b""  # the echo side closed after our EOF
            digests[i] = got

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(one, i)
        assert len(digests) == 8
        for got in digests.values():
            assert [a for a, _ in got] == [b for _, b in got]
        assert _channel_in_use(client, peer)  # the lean path carried it, not the fallback


async def test_many_small_messages_arrive_in_order() -> None:
    async with two_hosts() as (_, client, peer):
        stream = await client.open_stream(peer, ECHO)
        sent = b"".join(i.to_bytes(4, "big") for i in range(20_000))
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                async def writer() -> None:
                    for pos in range(0, len(sent), 4 * 7):
                        await stream.write(sent[pos:pos + 4 * 7])
                nursery.start_soon(writer)
                back = await _read_exactly(stream, len(sent))
        assert back == sent


async def test_a_reset_stream_ends_the_reader_and_the_connection_lives() -> None:
    async with two_hosts() as (server, client, peer):
        reader_saw: list[str] = []
        ended = trio.Event()

        async def hold(stream: Stream) -> None:
            try:
                while await stream.read():
                    pass
                reader_saw.append("eof")
            except STREAM_ERRORS as exc:
                reader_saw.append(type(exc).__name__)
            ended.set()

        server.set_handler("/test/hold/1", hold)
        stream = await client.open_stream(peer, "/test/hold/1")
        await stream.write(b"x" * 100)
        await trio.sleep(0.2)
        await stream.reset()
        with trio.fail_after(10):
            await ended.wait()
        assert reader_saw
        # the connection still carries new streams
        again = await client.open_stream(peer, ECHO)
        await again.write(b"still here")
        with trio.fail_after(10):
            assert await _read_exactly(again, 10) == b"still here"
