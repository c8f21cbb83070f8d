"""Behaviours of storage/ that survived a mutation pass (scripts/mutation, docs/TESTING.md).

Each test's docstring names the mutant it was written against.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from teammesh.protocols.errors import StorageError
from teammesh.storage.blockstore import CorruptBlock, FsBlockstore
from teammesh.storage.cid import BLAKE2B_256, RAW, SHA2_512, Cid
from teammesh.storage.dagpb import decode_unixfs

# multihash codes as varints (the multicodec table): blake2b-256 is 0xb220
BLAKE2B_256_VARINT = b"\xa0\xe4\x02"


@pytest.mark.parametrize("block", [b"", b"hello", b"x" * 5000])
def test_cids_with_other_hash_functions_verify_their_blocks(block: bytes) -> None:
    """Cid.verify: `actual = None`; _digest: blake2b without digest_size=32 (a 64-byte
    blake2b cut to 32 bytes is a different hash). The digests come from hashlib here."""
    assert BLAKE2B_256 == 0xB220
    blake = Cid(1, RAW, BLAKE2B_256_VARINT + b"\x20"
                + hashlib.blake2b(block, digest_size=32).digest())
    sha512 = Cid(1, RAW, bytes([SHA2_512, 64]) + hashlib.sha512(block).digest())
    for cid in (blake, sha512):
        assert cid.verify(block)
        assert not cid.verify(block + b"!")


def block_path(store: FsBlockstore, cid: Cid) -> Path:
    name = str(cid.to_v1())
    return store.root / "blocks" / name[-3:-1] / name


def test_every_corrupt_block_is_counted_and_refusals_name_the_cid(tmp_path: Path) -> None:
    """_discard_corrupt: `corrupt_blocks = 1`; put: CorruptBlock(None)."""
    store = FsBlockstore(tmp_path)
    for n in (1, 2):
        data = bytes([n]) * 100
        cid = Cid.of_block(RAW, data)
        store.put(cid, data)
        block_path(store, cid).write_bytes(b"rot" * 10)
        with pytest.raises(CorruptBlock):
            store.get(cid)
        assert store.corrupt_blocks == n
    cid = Cid.of_block(RAW, b"good")
    with pytest.raises(CorruptBlock, match=f"^refusing block {cid}: its bytes do not match"):
        store.put(cid, b"evil")
    assert not store.has(cid)


def test_unixfs_skips_fixed_width_fields_it_does_not_know() -> None:
    """dagpb._skip: a fixed32 skipped as 8 bytes (no test reached the fixed-width branch)."""
    known = bytes.fromhex("0802" "18e807")  # Type = 2 (file), filesize = 1000
    fixed32 = b"\x4d" + b"\x01\x02\x03\x04"  # field 9, wire type 5
    fixed64 = b"\x51" + b"\x00" * 8  # field 10, wire type 1
    for unknown in (fixed32, fixed64):
        got = decode_unixfs(unknown + known)
        assert (got.type, got.filesize) == (2, 1000)
    with pytest.raises(StorageError, match="truncated fixed-size"):
        decode_unixfs(known + b"\x4d\x01\x02")
