"""Every decoder in protocols/ and storage/ against hostile bytes (``pytest -m fuzz``).

The property, decoder by decoder: on random bytes and on mutations of valid encodings, the
only exceptions that escape are the project's own (TeammeshError subclasses), so a peer's
bytes can be refused by name at the edge and never reach a nursery as a crash. The first
section bounds what one msgpack message may allocate (issue 15, item 6).
"""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest
from teammesh.protocols import tasks, wire
from teammesh.protocols.errors import MalformedMessage

pytestmark = pytest.mark.fuzz

MiB = 1024 * 1024


def peak_bytes_while(fn: object, *args: object) -> tuple[BaseException | None, int]:
    """Run ``fn(*args)``; return the exception it raised (or None) and its peak allocation."""
    tracemalloc.start()
    try:
        try:
            fn(*args)  # type: ignore[operator]
        except Exception as exc:  # returned to the test, which asserts its type
            return exc, tracemalloc.get_traced_memory()[1]
        return None, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- msgpack bombs: bounded allocation per message -----------------------------------------


def empty_map_bomb(size: int) -> bytes:
    """A valid envelope whose ``x`` is a list of lists of empty maps, ``size`` bytes in all:
    one byte on the wire becomes a 64-byte dict in memory."""
    per_list = 60_000
    head = msgpack.packb({"t": "x", "v": 1})
    lists = (size - len(head)) // (per_list + 5)
    body = msgpack.packb([[{}] * per_list] * lists)
    return b"\x83" + head[1:] + msgpack.packb("x") + body


def test_empty_map_bomb_is_refused_within_bounded_memory(scenario_report) -> None:
    bomb = empty_map_bomb(wire.MAX_FRAME_BYTES - 64)
    assert len(bomb) <= wire.MAX_FRAME_BYTES
    exc, peak = peak_bytes_while(wire.unpack, bomb)
    assert isinstance(exc, MalformedMessage), exc
    assert "maps and lists" in str(exc)
    assert peak < 64 * MiB, f"decoding the bomb peaked at {peak / MiB:.0f} MiB"
    scenario_report("wire: 8 MiB frame of empty maps", tried=1, lost=0,
                    note=f"peak {peak / MiB:.0f} MiB")


def test_one_huge_list_of_nils_is_refused_within_bounded_memory() -> None:
    # 8 Mi one-byte nils: each costs an 8-byte pointer in a preallocated list
    bomb = b"\x83" + msgpack.packb({"t": "x", "v": 1})[1:] + msgpack.packb("x") \
        + b"\xdd" + (wire.MAX_FRAME_BYTES - 64).to_bytes(4, "big") \
        + b"\xc0" * (wire.MAX_FRAME_BYTES - 64)
    exc, peak = peak_bytes_while(wire.unpack, bomb)
    assert isinstance(exc, MalformedMessage), exc
    assert peak < 64 * MiB


@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k", b"\xdc\x00\x01", b"\xde\x00\x01\xa1k"])
def test_deep_nesting_is_refused(opener: bytes) -> None:
    deep = opener * 5000 + b"\xc0"
    exc, peak = peak_bytes_while(wire.unpack, deep)
    assert isinstance(exc, MalformedMessage), exc
    assert "deeper than" in str(exc)
    assert peak < 4 * MiB


def nested_envelope(depth: int, *, pad: int = 0) -> bytes:
    """An envelope whose field ``x`` nests lists so the whole message is ``depth`` deep."""
    inner: object = 0
    for _ in range(depth - 1):
        inner = [inner]
    return wire.pack({"t": "x", "v": 1, "x": inner, "pad": b"p" * pad})


@pytest.mark.parametrize("pad", [0, 64 * 1024])  # small messages skip the wrap; large wrap
def test_nesting_limit_is_exact(pad: int) -> None:
    assert wire.unpack(nested_envelope(wire.MAX_DEPTH, pad=pad))["t"] == "x"
    with pytest.raises(MalformedMessage, match="deeper than"):
        wire.unpack(nested_envelope(wire.MAX_DEPTH + 1, pad=pad))


def test_a_batch_of_4096_small_tasks_still_decodes() -> None:
    specs = [tasks.TaskSpec(id=f"t{i:032x}", kind="hash.sha256", version="1",
                            input=b"x" * 64, params={"n": i, "mode": "fast"},
                            timeout_ms=30_000) for i in range(tasks.MAX_BATCH)]
    (payload,) = wire.FrameDecoder().feed(tasks.assign(specs))
    m = wire.unpack(payload)
    assert [tasks.TaskSpec.from_wire(t) for t in m["tasks"]] == specs


def test_a_large_flat_output_within_the_frame_still_decodes() -> None:
    # 800k floats (7.2 MB): a legitimate result under the frame limit is not a bomb
    floats = [float(i) for i in range(800_000)]
    assert wire.unpack(wire.pack({"t": "x", "v": 1, "o": floats}))["o"] == floats


def test_the_budget_scales_with_the_size_limit() -> None:
    # the 64 KiB gossip limit allows 2,048 maps and lists: 3,000 empty maps are refused
    msg = wire.pack({"t": "x", "v": 1, "x": [{}] * 3000})
    assert len(msg) < wire.MAX_GOSSIP_BYTES
    with pytest.raises(MalformedMessage, match="maps and lists"):
        wire.unpack(msg, max_bytes=wire.MAX_GOSSIP_BYTES)
    assert len(wire.unpack(msg)["x"]) == 3000
