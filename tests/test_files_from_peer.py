"""Files from IPFS peers outside the team: `teammesh get --from` and `files.providers`.

A real Helia node (tests/helia/peer.mjs, as in tests/test_bitswap.py) adds a file; the
`teammesh` CLI and daemon fetch it from Helia over Bitswap. Also what is refused: an
address that names no peer, an address whose peer is not the one named, a provider that
sends a bad block, a file over files.max_file_mb, and serving a provider we only fetch
from. No timing assertions: waits are bounded and only fail a test when nothing happens.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from meshtools import CLI, Daemon, init_home, run_cli
from teammesh.protocols.identity import Identity
from teammesh.storage.cid import Cid
from teammesh.storage.unixfs import cid_of_bytes
from test_bitswap import Helia, import_bytes, needs_helia, open_helia, open_node

MiB = 1024 * 1024
CLI_LIMIT_S = 120  # one CLI run, under a loaded machine


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def teammesh(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI without blocking the trio loop (a py node in this process may serve)."""
    with trio.fail_after(CLI_LIMIT_S):
        return await trio.run_process([*CLI, "--home", str(home), *args], check=False,
                                      capture_stdout=True, capture_stderr=True)


def error_of(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stderr.decode()


async def helia_file(helia: Helia, tmp: Path, size: int, *, kubo: bool = True) -> tuple[str,
                                                                                         bytes]:
    data = os.urandom(size)
    src = tmp / f"src-{size}-{kubo}"
    src.write_bytes(data)
    added = await helia.call("add", path=str(src), kubo=kubo)
    return str(added["cid"]), data


@needs_helia
@pytest.mark.parametrize("kubo", [True, False], ids=["kubo-layout", "helia-default-layout"])
async def test_get_from_helia_is_byte_identical(kubo: bool, tmp_path: Path) -> None:
    """No node, no team, no init: the CLI fetches from the peer it is given."""
    async with open_helia() as helia:
        cid, data = await helia_file(helia, tmp_path, 6 * MiB + 12345, kubo=kubo)
        out = tmp_path / "out.bin"
        proc = await teammesh(tmp_path / "home", "get", cid, "--from", helia.addr,
                              "-o", str(out), "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        result = json.loads(proc.stdout)
        assert result["source"] == "providers"
        assert result["providers"] == [helia.addr]
        assert result["size"] == len(data)
        assert sha(out.read_bytes()) == sha(data)
        if kubo:
            assert Cid.parse(cid) == cid_of_bytes(data)  # and we name it as Helia does
        # nothing of the fetch is left beside the output
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@needs_helia
async def test_addresses_that_do_not_name_the_peer_are_refused(tmp_path: Path) -> None:
    async with open_helia() as helia:
        cid, _ = await helia_file(helia, tmp_path, 300_000)
        out = tmp_path / "out.bin"
        # no /p2p/ part: nobody to check the blocks' sender against; refused, not dialed
        bare = helia.addr.rpartition("/p2p/")[0]
        err = error_of(await teammesh(tmp_path / "home", "get", cid, "--from", bare,
                                      "-o", str(out)))
        assert "/p2p/<peer id>" in err
        # the address is Helia's but the peer id another's: Noise proves who answers,
        # and it is not the peer named
        stranger = Identity(bytes(range(32))).peer_id
        wrong = f"{bare}/p2p/{stranger}"
        err = error_of(await teammesh(tmp_path / "home", "get", cid, "--from", wrong,
                                      "-o", str(out)))
        assert "no provider could be reached" in err
        assert stranger in err
        assert not out.exists()


async def test_a_provider_sending_a_bad_block_fails_the_fetch(tmp_path: Path) -> None:
    """An outside peer (a py Bitswap node here) corrupts the root block: the fetch fails
    at once with a message naming the peer, and writes nothing under the output name."""
    data = os.urandom(2 * MiB)
    root, blocks = import_bytes(data)

    def corrupt(cid: Cid) -> bytes | None:
        b = blocks.get(cid)
        return b"\x00" + b[1:] if b is not None and cid == root else b

    async with open_node(get=corrupt) as liar:
        addr = f"{liar.host.addrs[0]}"
        if "/p2p/" not in addr:
            addr += f"/p2p/{liar.host.peer_id}"
        out = tmp_path / "out.bin"
        err = error_of(await teammesh(tmp_path / "home", "get", str(root), "--from", addr,
                                      "-o", str(out)))
        assert liar.host.peer_id in err
        assert "matches no CID" in err
        assert not out.exists()
        assert not list(tmp_path.glob("out.bin*"))
        # and an honest outside peer with the same blocks serves the file whole
        async with open_node(blocks) as honest:
            addr = f"{honest.host.addrs[0]}"
            if "/p2p/" not in addr:
                addr += f"/p2p/{honest.host.peer_id}"
            proc = await teammesh(tmp_path / "home", "get", str(root), "--from", addr,
                                  "-o", str(out), "--json")
            assert proc.returncode == 0, proc.stderr.decode()
            assert sha(out.read_bytes()) == sha(data)


@needs_helia
async def test_a_file_over_max_file_mb_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[files]\nmax_file_mb = 1\n")
    async with open_helia() as helia:
        cid, _ = await helia_file(helia, tmp_path, 3 * MiB)
        out = tmp_path / "out.bin"
        err = error_of(await teammesh(home, "get", cid, "--from", helia.addr,
                                      "-o", str(out)))
        assert "files.max_file_mb" in err
        assert not out.exists()


def write_config(home: Path, text: str) -> None:
    config = home / "config.toml"
    config.write_text(config.read_text() + "\n" + text)


@needs_helia
async def test_the_node_fetches_from_files_providers_and_does_not_serve_them(
        tmp_path: Path) -> None:
    home = init_home(tmp_path / "n0")
    run_cli(home, "team", "create", "testteam")
    async with open_helia() as helia:
        cid, data = await helia_file(helia, tmp_path, 5 * MiB)
        out = tmp_path / "out.bin"
        # no daemon and no provider: the message says how to name one
        err = error_of(await teammesh(home, "get", cid, "-o", str(out)))
        assert "--from" in err
        # a daemon with no team peer and no provider: the same advice, from the node
        node = Daemon(home).start()
        try:
            err = error_of(await teammesh(home, "get", cid, "-o", str(out)))
            assert "no team peer is connected and no provider is set" in err
            assert "--from" in err
        finally:
            node.stop()
        assert not out.exists()

        # the provider in the config: the node dials it and fetches through its store
        write_config(home, f'[files]\nproviders = ["{helia.addr}"]\n')
        node = Daemon(home).start()
        try:
            proc = await teammesh(home, "get", cid, "-o", str(out), "--json")
            assert proc.returncode == 0, proc.stderr.decode()
            result: dict[str, Any] = json.loads(proc.stdout)
            assert result["source"] == "peers"
            assert sha(out.read_bytes()) == sha(data)
            listed = json.loads((await teammesh(home, "files", "list", "--json")).stdout)
            assert cid in [f["cid"] for f in listed["files"]]
            # Helia is connected to the node now, but a provider is not served for being
            # one (files.serve = "members", no files.allow_peers): its fetch of a file
            # the node holds finds no block
            mine = tmp_path / "mine.bin"
            mine.write_bytes(os.urandom(300_000))
            shared = json.loads((await teammesh(home, "share", str(mine), "--json")).stdout)
            with pytest.raises(AssertionError, match="Helia cat failed"):
                await helia.call("cat", cid=shared["cid"], out=str(tmp_path / "h.bin"),
                                 timeout_ms=3000, limit_s=30)
        finally:
            node.stop()


async def test_a_provider_that_is_down_is_not_dialed_for_every_fetch(tmp_path: Path) -> None:
    """A configured provider that refuses connections: the first fetch names the dial
    error; the next ones (within a minute) do not dial it again and say so, with the way
    to try now (--from)."""
    import socket

    with socket.socket() as s:  # a port nobody listens on (closed right away)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ghost = Identity(os.urandom(32)).peer_id
    home = init_home(tmp_path / "n0")
    run_cli(home, "team", "create", "testteam")
    write_config(home, f'[files]\nproviders = ["/ip4/127.0.0.1/tcp/{port}/p2p/{ghost}"]\n')
    cid = str(cid_of_bytes(os.urandom(1000)))
    out = tmp_path / "out.bin"
    node = Daemon(home).start()
    try:
        first = error_of(await teammesh(home, "get", cid, "-o", str(out)))
        assert "no provider could be reached" in first
        assert str(port) in first
        second = error_of(await teammesh(home, "get", cid, "-o", str(out)))
        assert "could be reached in the last 60 s" in second
        assert "--from" in second
    finally:
        node.stop()
    assert not out.exists()
