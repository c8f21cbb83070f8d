"""CIDs, dag-pb and the streaming UnixFS importer/exporter (teammesh.storage).

Root CIDs are checked against hard-coded values, and those values against the
``aleph-cid`` package (a Rust port of Kubo's importer, a dependency of the project), so no
expected CID comes only from our own importer. aleph-cid also cross-checks the importer on
random data of the sizes where the DAG shape changes.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aleph_cid
import numpy as np
import pytest
from teammesh.protocols.errors import LocalProtocolError, StorageError
from teammesh.storage.cid import DAG_PB, RAW, Cid, decode_varint, encode_varint
from teammesh.storage.dagpb import (
    UNIXFS_DIRECTORY,
    UNIXFS_FILE,
    PBLink,
    PBNode,
    UnixFSData,
    decode_node,
    decode_unixfs,
    encode_node,
    encode_unixfs,
)
from teammesh.storage.unixfs import (
    CHUNK_SIZE,
    DEFAULT_MAX_FILE_BYTES,
    MAX_LINKS,
    FileExporter,
    FileImporter,
    FileTooLarge,
    cid_of_bytes,
    cid_of_file,
    claimed_size,
    export_file,
    links_of,
)

C = CHUNK_SIZE
MiB = 1 << 20
EMPTY_V1 = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
EMPTY_V0 = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"


def pattern(n: int) -> bytes:
    """Deterministic, platform-independent bytes whose chunks all differ."""
    return np.arange((n + 3) // 4, dtype="<u4").tobytes()[:n]


def random_pieces(seed: int, total: int, piece: int = MiB) -> Iterator[bytes]:
    rng = np.random.default_rng(seed)
    left = total
    while left > 0:
        n = min(piece, left)
        yield rng.bytes(n)
        left -= n


def import_all(data: bytes, **kw: Any) -> tuple[Cid, dict[Cid, bytes]]:
    imp = FileImporter(**kw)
    blocks: dict[Cid, bytes] = {}
    step = 1_000_003  # deliberately not aligned with the chunk size
    for i in range(0, len(data), step):
        blocks.update(imp.feed(data[i : i + step]))
    root, rest = imp.finish()
    blocks.update(rest)
    return root, blocks


def aleph_v1(pieces: Iterator[bytes] | list[bytes]) -> str:
    h = aleph_cid.CidHasher.for_ipfs_v1_raw_leaves()
    for p in pieces:
        h.update(p)
    return str(h.finalize())


# -- known answers ---------------------------------------------------------------------------

# (data, CIDv1 raw leaves, CIDv0) as Kubo's `ipfs add` prints them; checked against
# aleph-cid by test_known_cids_are_what_aleph_cid_computes, not taken from our importer.
KNOWN: list[tuple[bytes, str, str]] = [
    (b"", EMPTY_V1, EMPTY_V0),
    (
        b"hello world\n",
        "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4",
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o",
    ),
    (
        pattern(C + 1),
        "bafybeighp4oom4wr7bokfuxsg3yrmxtbv6utbaropfgcudvjevnooskhe4",
        "QmQ2vSYVPShrETqxXWaotPeNwd9YDzw1mtqmGr5JXHR6Ko",
    ),
    (
        pattern(175 * C + 17),  # two levels of dag-pb above the leaves
        "bafybeiar567wgoy6iv653il5d46bgnsb4j777gnvlf7owt3ve27jar3wgi",
        "Qmc1vyE5ZH9DMzwvAkDcYVVoMsAACAJejnGLA7BoUs9gzd",
    ),
]
KNOWN_IDS = ["empty", "hello", "chunk+1", "175chunks+17"]


@pytest.mark.parametrize(("data", "v1", "v0"), KNOWN, ids=KNOWN_IDS)
def test_known_cids_are_what_aleph_cid_computes(data: bytes, v1: str, v0: str) -> None:
    assert aleph_v1([data]) == v1
    assert aleph_cid.compute_cid(data) == v0


@pytest.mark.parametrize(("data", "v1", "v0"), KNOWN, ids=KNOWN_IDS)
def test_known_cids(data: bytes, v1: str, v0: str) -> None:
    assert str(cid_of_bytes(data)) == v1
    assert str(cid_of_bytes(data, cid_version=0)) == v0
    root, blocks = import_all(data)
    assert str(root) == v1
    assert all(cid.verify(block) for cid, block in blocks.items())


def test_single_chunk_root_is_the_raw_leaf() -> None:
    for n in (1, C):
        data = pattern(n)
        root, blocks = import_all(data)
        assert root.codec == RAW
        assert root.version == 1
        assert blocks == {root: data}
    root, blocks = import_all(b"")
    assert str(root) == EMPTY_V1
    assert blocks == {root: b""}


def test_empty_v0_node_is_byte_exact() -> None:
    block = encode_node(PBNode((), encode_unixfs(UnixFSData(2, None, 0))))
    assert block == bytes.fromhex("0a0408021800")
    assert str(Cid.of_block(DAG_PB, block, 0)) == EMPTY_V0


# -- cross-checks with aleph-cid -----------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, C, C + 1, 10 * MiB, 174 * C, 174 * C + 1, 175 * C + 17])
def test_matches_aleph_cid(size: int) -> None:
    pieces = list(random_pieces(size, size))
    expected = aleph_v1(pieces)
    imp = FileImporter(keep_blocks=False)
    for p in pieces:
        imp.feed(p)
    assert str(imp.finish()[0]) == expected
    assert str(cid_of_bytes(b"".join(pieces))) == expected


@pytest.mark.parametrize("size", [0, 1, C, C + 1, 174 * C + 1, 175 * C + 17])
def test_v0_matches_aleph_cid(size: int) -> None:
    data = b"".join(random_pieces(size, size))
    assert str(cid_of_bytes(data, cid_version=0)) == aleph_cid.compute_cid(data)


def test_100mib_matches_aleph_cid() -> None:
    h = aleph_cid.CidHasher.for_ipfs_v1_raw_leaves()
    imp = FileImporter()
    nblocks = 0
    for piece in random_pieces(100, 100 * MiB):
        h.update(piece)
        nblocks += len(imp.feed(piece))
    root, rest = imp.finish()
    assert str(root) == str(h.finalize())
    assert nblocks + len(rest) == 400 + 4  # 400 leaves, parents of 174+174+52 leaves, root


def test_cid_of_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = pattern(175 * C + 17)
    path.write_bytes(data)
    assert str(cid_of_file(path)) == "bafybeiar567wgoy6iv653il5d46bgnsb4j777gnvlf7owt3ve27jar3wgi"
    (tmp_path / "e").write_bytes(b"")
    assert str(cid_of_file(tmp_path / "e")) == EMPTY_V1


# -- DAG shape ---------------------------------------------------------------------------------


def leaf_depths(root: Cid, blocks: dict[Cid, bytes]) -> set[int]:
    depths: set[int] = set()
    stack = [(root, 0)]
    while stack:
        cid, d = stack.pop()
        children = links_of(cid, blocks[cid])
        if not children:
            depths.add(d)
        stack.extend((c, d + 1) for c in children)
    return depths


def subtree_size(cid: Cid, blocks: dict[Cid, bytes]) -> int:
    return len(blocks[cid]) + sum(subtree_size(c, blocks) for c in links_of(cid, blocks[cid]))


@pytest.mark.parametrize(("n", "depth"), [(1, 0), (3, 1), (4, 2), (9, 2), (10, 3), (27, 3)])
def test_balanced_shape_with_small_parameters(n: int, depth: int) -> None:
    """Chunk size 1, at most 3 links: every leaf sits at the same depth, lone tails
    are wrapped, Tsize is cumulative and the exporter gives the bytes back."""
    data = bytes(range(n))
    root, blocks = import_all(data, chunk_size=1, max_links=3)
    assert leaf_depths(root, blocks) == {depth}
    for cid, block in blocks.items():
        if cid.codec == DAG_PB:
            node = decode_node(block)
            assert 1 <= len(node.links) <= 3
            assert all(link.name == "" for link in node.links)
            assert [link.tsize for link in node.links] == [
                subtree_size(link.cid, blocks) for link in node.links
            ]
            assert node.data is not None
            u = decode_unixfs(node.data)
            assert u.filesize == sum(u.blocksizes)
    assert b"".join(export_file(root, blocks.__getitem__)) == data


def test_lone_tail_wrapped_per_level() -> None:
    """174 full leaves then one byte: the byte's leaf gets its own one-link parent."""
    data = pattern(174 * C + 1)
    root, blocks = import_all(data)
    top = decode_node(blocks[root])
    assert len(top.links) == 2
    tail = decode_node(blocks[top.links[1].cid])
    assert len(tail.links) == 1
    assert tail.links[0].tsize == 1
    assert tail.links[0].cid.codec == RAW
    assert top.links[1].tsize == len(blocks[top.links[1].cid]) + 1


def test_links_of() -> None:
    data = pattern(3 * C + 5)
    root, blocks = import_all(data)
    children = links_of(root, blocks[root])
    assert len(children) == 4
    assert [len(blocks[c]) for c in children] == [C, C, C, 5]
    assert links_of(children[0], blocks[children[0]]) == []
    with pytest.raises(StorageError):
        links_of(Cid.of_block(0x71, b"x"), b"x")


# -- export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, C, C + 1, 3 * C + 7, 175 * C + 17])
@pytest.mark.parametrize("version", [0, 1])
def test_round_trip(size: int, version: int) -> None:
    data = b"".join(random_pieces(size + 7, size))
    root, blocks = import_all(data, cid_version=version)
    fetched: list[Cid] = []

    def get(cid: Cid) -> bytes:
        fetched.append(cid)
        return blocks[cid]

    exporter = FileExporter(root, get)
    assert exporter.size() == size
    out = b"".join(exporter)
    assert out == data
    assert len(fetched) == len(blocks)  # each block fetched once (root cached by size())


def corrupted(blocks: dict[Cid, bytes], victim: Cid) -> Callable[[Cid], bytes]:
    bad = bytearray(blocks[victim])
    bad[len(bad) // 2] ^= 1

    def get(cid: Cid) -> bytes:
        return bytes(bad) if cid == victim else blocks[cid]

    return get


def test_corrupted_leaf_raises() -> None:
    data = pattern(3 * C + 7)
    root, blocks = import_all(data)
    victim = links_of(root, blocks[root])[2]
    pieces = export_file(root, corrupted(blocks, victim))
    assert next(pieces) + next(pieces) == data[: 2 * C]  # streaming: good prefix first
    with pytest.raises(StorageError, match="does not match its hash"):
        next(pieces)


def test_corrupted_root_and_swapped_block_raise() -> None:
    data = pattern(175 * C + 17)
    root, blocks = import_all(data)
    with pytest.raises(StorageError):
        b"".join(export_file(root, corrupted(blocks, root)))
    first, second = links_of(root, blocks[root])

    def swapped(cid: Cid) -> bytes:  # a valid block, but not the one asked for
        return blocks[second] if cid == first else blocks[cid]

    with pytest.raises(StorageError):
        b"".join(export_file(root, swapped))


def test_export_rejects_lies_about_sizes() -> None:
    leaf = b"abc"
    leaf_cid = Cid.of_block(RAW, leaf)
    node = encode_node(
        PBNode((PBLink(leaf_cid, "", 3),), encode_unixfs(UnixFSData(2, None, 5, (5,))))
    )
    root = Cid.of_block(DAG_PB, node)
    store = {root: node, leaf_cid: leaf}
    with pytest.raises(StorageError, match="parent says 5"):
        b"".join(export_file(root, store.__getitem__))
    with pytest.raises(StorageError, match="limit"):
        b"".join(export_file(root, store.__getitem__, max_size=4))
    directory = encode_node(PBNode((), encode_unixfs(UnixFSData(UNIXFS_DIRECTORY))))
    dir_cid = Cid.of_block(DAG_PB, directory)
    with pytest.raises(StorageError, match="not a file"):
        b"".join(export_file(dir_cid, {dir_cid: directory}.__getitem__))
    with pytest.raises(StorageError):
        decode_node(b"\x0a\x05ab")  # truncated Data field


# -- memory --------------------------------------------------------------------------------------


def test_import_memory_is_bounded() -> None:
    """100 MiB fed 1 MiB at a time, blocks dropped after each feed: the importer never
    holds more than a few MiB (the feed's own 1 MiB of blocks included)."""
    rng = np.random.default_rng(7)
    base = rng.bytes(MiB)
    imp = FileImporter()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for i in range(100):
            piece = base[i:] + base[:i]  # differing content, 1 MiB per feed
            for cid, block in imp.feed(memoryview(piece)[: MiB - 100 + i]):
                assert len(block) <= C
                assert cid.version == 1
            del piece
        root, rest = imp.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert imp.bytes_fed > 99 * MiB
    assert root.codec == DAG_PB
    assert len(rest) >= 2
    assert peak < 4 * MiB, f"peak {peak / MiB:.1f} MiB"


# -- CIDs and multiformats --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        EMPTY_V0,
        EMPTY_V1,
        "bafybeiar567wgoy6iv653il5d46bgnsb4j777gnvlf7owt3ve27jar3wgi",
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o",
    ],
)
def test_cid_parse_str_round_trip(text: str) -> None:
    cid = Cid.parse(text)
    assert str(cid) == text
    assert Cid.from_bytes(cid.to_bytes()) == cid
    assert Cid.parse(str(cid)) == cid
    assert cid.hash_code == 0x12
    assert len(cid.digest) == 32
    assert hash(cid) == hash(Cid.parse(text))


def test_cid_fields_and_other_bases() -> None:
    v0 = Cid.parse(EMPTY_V0)
    assert (v0.version, v0.codec) == (0, DAG_PB)
    assert v0.to_bytes() == v0.multihash
    assert len(v0.multihash) == 34
    v1 = v0.to_v1()
    assert str(v1).startswith("bafy")
    assert v1.multihash == v0.multihash
    assert v1 != v0
    raw = Cid.parse(EMPTY_V1)
    assert (raw.version, raw.codec) == (1, RAW)
    assert raw.to_bytes()[:4] == b"\x01\x55\x12\x20"
    assert raw.digest == hashlib.sha256(b"").digest()
    assert Cid.parse(EMPTY_V1.upper()) == raw
    assert Cid.parse("f" + raw.to_bytes().hex()) == raw
    assert repr(raw) == f"Cid({EMPTY_V1!r})"


def test_cid_verify() -> None:
    block = b"hello world\n"
    cid = cid_of_bytes(block)
    assert cid.verify(block)
    assert not cid.verify(block + b"!")
    assert Cid.of_block(RAW, block) == cid
    ident = Cid(1, RAW, b"\x00\x03abc")
    assert ident.verify(b"abc")
    assert not ident.verify(b"abcd")
    unknown = Cid(1, RAW, b"\x99\x01\x02ab")  # unsupported hash function
    assert not unknown.verify(b"ab")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "Qm" + "1" * 44,  # base58 but not a valid multihash
        "bafy!!!",
        "xyz",
        "zQmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH",
        EMPTY_V1[:-4],  # truncated digest
        "b" + "a" * 5000,
    ],
)
def test_cid_parse_rejects(bad: str) -> None:
    with pytest.raises(StorageError):
        Cid.parse(bad)


def test_cid_constructor_validation() -> None:
    with pytest.raises(StorageError):
        Cid(2, RAW, b"\x12\x20" + bytes(32))
    with pytest.raises(StorageError):
        Cid(0, RAW, b"\x12\x20" + bytes(32))  # v0 is always dag-pb
    with pytest.raises(StorageError):
        Cid(1, RAW, b"\x12\x20" + bytes(31))
    with pytest.raises(StorageError):
        Cid.from_bytes(b"\x02\x55\x12\x20" + bytes(32))


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, C, 2**32, 2**63 - 1])
def test_varint_round_trip(value: int) -> None:
    enc = encode_varint(value)
    assert decode_varint(enc + b"tail") == (value, len(enc))


def test_varint_rejects() -> None:
    with pytest.raises(StorageError):
        decode_varint(b"\x80")  # truncated
    with pytest.raises(StorageError):
        decode_varint(b"\x80\x00")  # non-minimal
    with pytest.raises(StorageError):
        decode_varint(b"\xff" * 10)
    with pytest.raises(LocalProtocolError, match="non-negative"):
        encode_varint(-1)


def test_dagpb_round_trip_and_field_order() -> None:
    child = cid_of_bytes(b"x")
    node = PBNode((PBLink(child, "", 1), PBLink(child, "name", None)), b"\x08\x02")
    block = encode_node(node)
    assert block[0] == 0x12  # Links (field 2) come before Data (field 1)
    assert block.endswith(b"\x0a\x02\x08\x02")
    assert decode_node(block) == node
    u = UnixFSData(2, b"data", 4, (1, 2, 3))
    assert decode_unixfs(encode_unixfs(u)) == u
    assert decode_unixfs(b"\x08\x02\x22\x02\x01\x02") == UnixFSData(2, None, None, (1, 2))


# -- files made of repeated blocks ---------------------------------------------------------


def repeated_dag(levels: int, fanout: int = MAX_LINKS, leaf: bytes | None = None
                 ) -> tuple[Cid, int, list[tuple[Cid, bytes]]]:
    """A file whose every node links ``fanout`` times to one child: (root, claimed size,
    the ``levels + 1`` distinct blocks). Four levels over a 256 KiB leaf claim 218 TiB."""
    leaf = pattern(CHUNK_SIZE) if leaf is None else leaf
    cid, size = Cid.of_block(RAW, leaf), len(leaf)
    blocks = [(cid, leaf)]
    tsize = size
    for _ in range(levels):
        data = encode_unixfs(UnixFSData(UNIXFS_FILE, None, size * fanout, (size,) * fanout))
        node = encode_node(PBNode(tuple(PBLink(cid, "", tsize) for _ in range(fanout)), data))
        cid, size, tsize = Cid.of_block(DAG_PB, node), size * fanout, len(node) + tsize * fanout
        blocks.append((cid, node))
    return cid, size, blocks


def test_a_repeated_block_file_claiming_218_tib_is_refused_by_default() -> None:
    root, claimed, blocks = repeated_dag(4)
    assert claimed == CHUNK_SIZE * MAX_LINKS**4
    store = dict(blocks)
    assert claimed_size(root, store[root]) == claimed
    exporter = FileExporter(root, store.__getitem__)
    with pytest.raises(FileTooLarge, match=f"limit for one file \\({DEFAULT_MAX_FILE_BYTES}") as e:
        exporter.size()
    assert (e.value.size, e.value.limit) == (claimed, DEFAULT_MAX_FILE_BYTES)
    with pytest.raises(FileTooLarge):
        next(iter(export_file(root, store.__getitem__)))


def test_a_repeated_block_file_under_the_limit_exports_exactly_its_claim() -> None:
    # sizes that add up are believed up to the caller's limit, and no further
    root, claimed, blocks = repeated_dag(2, fanout=3, leaf=b"xyz")
    assert claimed == 27
    store = dict(blocks)
    assert b"".join(export_file(root, store.__getitem__, max_size=27)) == b"xyz" * 9
    with pytest.raises(FileTooLarge, match="26 bytes"):
        b"".join(export_file(root, store.__getitem__, max_size=26))


def test_claimed_size_rejects_nodes_whose_sizes_do_not_add_up() -> None:
    leaf_cid = Cid.of_block(RAW, b"abc")
    node = encode_node(
        PBNode((PBLink(leaf_cid, "", 3),), encode_unixfs(UnixFSData(2, None, 1 << 50, (3,))))
    )
    with pytest.raises(StorageError, match="add up"):
        claimed_size(Cid.of_block(DAG_PB, node), node)
