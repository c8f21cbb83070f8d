"""teammesh.client.AsyncClient under trio and under asyncio, on one real daemon
(issue 20, item 5). tests/test_client_futures.py drives it across a mesh (cancel,
closing with pending futures); here one node runs the tasks itself, and each call a
user makes is checked for what it returns or raises.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from meshtools import Daemon, mesh

from teammesh.client import AsyncClient, TaskFailed


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with mesh(tmp_path_factory.mktemp("async"), 1, slots=[2]) as (d,):
        yield d


def _b64(x: bytes) -> str:
    return base64.b64encode(x).decode()


async def _use_the_client(home: Path) -> None:
    inputs = [os.urandom(512) for _ in range(20)]
    with anyio.fail_after(180):
        # one-call methods over HTTP, outside the block
        plain = AsyncClient.from_home(home, timeout=120)
        try:
            t = await plain.submit("hash.sha256", inputs[0], no_cache=True)
            assert t["state"] in ("queued", "running", "done")
            done = await plain.task(t["id"], wait=60)  # a long poll until it ends
            assert done["state"] == "done"
            assert done["output"] == hashlib.sha256(inputs[0]).hexdigest()
            assert t["id"] in {x["id"] for x in await plain.tasks(limit=50)}
        finally:
            await plain.__aexit__(None, None, None)

        async with AsyncClient.from_home(home, timeout=120) as c:
            assert (await c.status())["slots"] == 2
            rec = await c.submit("base64.encode", b"abc", wait=True, no_cache=True)
            assert (rec["state"], rec["output"]) == ("done", "YWJj")
            # map + gather keep the inputs' order
            outs = await c.gather(c.map("base64.encode", inputs, no_cache=True))
            assert outs == [_b64(x) for x in inputs]
            # a failed task raises TaskFailed, with the node's reason and the task id
            bad = c.future("base64.decode", b"@@", no_cache=True)
            with pytest.raises(TaskFailed, match="invalid base64 character") as info:
                await bad
            assert info.value.task_id == bad.id
            assert (await c.task(bad.id))["state"] == "failed"
            # gather raises the first failure, or returns it in place when asked
            mixed = [c.future("base64.decode", _b64(b"ok").encode(), no_cache=True),
                     c.future("base64.decode", b"@@", no_cache=True)]
            with pytest.raises(TaskFailed):
                await c.gather(mixed)
            got = await c.gather(mixed, return_exceptions=True)
            assert got[0] == b"ok", got[0]
            assert isinstance(got[1], TaskFailed)
            # submit(wait=True) reports a failure in the record, as over HTTP
            rec = await c.submit("base64.decode", b"@@", wait=True, no_cache=True)
            assert rec["state"] == "failed"
            assert "invalid base64 character" in rec["error"]


async def test_async_client_under_trio(node: Daemon) -> None:
    await _use_the_client(node.home)


def test_async_client_under_asyncio(node: Daemon) -> None:
    asyncio.run(_use_the_client(node.home))
