"""The futures client against real daemons: a submitter with no slots and an executor
with three, so every task crosses the mesh and runs in the executor's worker processes.

Sleeps are cancelled only once the executor shows them in their slots: a cancel that
reaches the executor sooner is lost there today (the job then runs to its end, holding
its slot, while the submitter counts it as cancelled), which would stall later tests."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from meshtools import Daemon, mesh, wait_for_full_mesh, wait_until
from teammesh.protocols.errors import NodeNotRunning, TaskError, TeammeshError

from teammesh.client import AsyncClient, Client, ClientClosed, TaskCancelled, TaskFailed

IO_THREAD = "teammesh-client-io"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Daemon]]:
    with mesh(tmp_path_factory.mktemp("futures"), 2, slots=[0, 3]) as ds:
        wait_for_full_mesh(ds, timeout=30)
        yield ds


@pytest.fixture
def home(nodes: list[Daemon]) -> Path:
    return nodes[0].home


def _b64(x: bytes) -> str:
    return base64.b64encode(x).decode()


def _wait_busy(executor: Daemon, n: int) -> None:
    """Until exactly n of the executor's slots are running a task."""
    with Client.from_home(executor.home) as ex:
        def busy() -> bool:
            st = ex.status()
            return bool(st["slots"] - st["free_slots"] == n)
        wait_until(busy, 60, what=f"{n} busy slots on the executor")


async def _await_busy(executor: Daemon, n: int) -> None:
    async with AsyncClient.from_home(executor.home) as ex:
        for _ in range(600):  # bounded: 60 s
            st = await ex.status()
            if st["slots"] - st["free_slots"] == n:
                return
            await anyio.sleep(0.1)
    raise AssertionError(f"the executor never had {n} busy slots")


def _io_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == IO_THREAD]


def test_futures_resolve_with_the_outputs(home: Path, nodes: list[Daemon]) -> None:
    inputs = [os.urandom(1024) for _ in range(40)]
    with Client.from_home(home, timeout=120) as c:
        one = c.future("base64.encode", b"teammesh", no_cache=True)
        futs = c.map("base64.encode", inputs, no_cache=True)
        urlsafe = c.future("base64.encode", b"\xfb\xff", {"urlsafe": True}, no_cache=True)
        assert one.result(60) == _b64(b"teammesh")
        assert c.gather(futs, timeout=60) == [_b64(x) for x in inputs]
        assert urlsafe.result(60) == "-_8="
        assert all(f.done() for f in futs)
        # the future's id is the node's task id, and the task ran on the executor
        record = c.task(one.id)
        assert record["state"] == "done"
        assert record["output"] == _b64(b"teammesh")
        assert one.record()["executed_by"] == nodes[1].peer_id
        # byte outputs come back as bytes
        assert c.future("base64.decode", b"dGVhbQ==", no_cache=True).result(60) == b"team"


def test_a_failed_task_raises_with_the_reason(home: Path) -> None:
    with Client.from_home(home, timeout=120) as c:
        good = c.map("base64.encode", [b"a", b"b"], no_cache=True)
        bad = c.future("base64.decode", b"@@@@", no_cache=True)
        # refused at submission (a bad option): only this one fails, not its neighbours
        refused = c.future("base64.encode", b"c", where="nowhere")
        unknown = c.future("no.such.kind", b"x")
        with pytest.raises(TaskFailed) as info:
            bad.result(60)
        assert "invalid base64 character" in info.value.reason
        assert info.value.task_id == bad.id
        assert isinstance(info.value, TaskError)
        assert isinstance(bad.exception(0), TeammeshError)
        with pytest.raises(TaskError, match="'where' must be one of"):
            refused.result(60)
        with pytest.raises(TaskFailed, match=r"no\.such\.kind"):
            unknown.result(60)
        assert c.gather(good, timeout=60) == ["YQ==", "Yg=="]
        out = c.gather([good[0], bad], return_exceptions=True, timeout=60)
        assert out[0] == "YQ=="
        assert isinstance(out[1], TaskFailed)


def test_cancel_cancels_the_task_on_the_node(home: Path, nodes: list[Daemon]) -> None:
    with Client.from_home(home, timeout=120) as c:
        slow = c.future("sleep", params={"seconds": 120}, no_cache=True)
        task_id = slow.id
        _wait_busy(nodes[1], 1)
        assert c.task(task_id)["state"] == "running"
        assert slow.cancel()
        assert slow.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            slow.result(0)
        assert c.task(task_id, wait=60)["state"] == "cancelled"
        _wait_busy(nodes[1], 0)  # the executor stopped it
        # a task cancelled by someone else settles as TaskCancelled
        other = c.future("sleep", params={"seconds": 121}, no_cache=True)
        _wait_busy(nodes[1], 1)
        c.cancel(other.id)
        with pytest.raises(TaskCancelled):
            other.result(60)
        _wait_busy(nodes[1], 0)
        # cancelling a settled future changes nothing
        done = c.future("base64.encode", b"x", no_cache=True)
        assert done.result(60) == "eA=="
        assert not done.cancel()
        assert c.task(done.id)["state"] == "done"
        assert not [t for t in c.tasks(state="running") if t["kind"] == "sleep"]


def test_executor_map_over_500_inputs_keeps_order(home: Path) -> None:
    inputs = [os.urandom(1024) for _ in range(500)]
    with Client.from_home(home, timeout=300) as c:
        with c.executor() as ex:
            assert isinstance(ex, concurrent.futures.Executor)
            outs = list(ex.map("base64.encode", inputs, timeout=300))
            fut = ex.submit("base64.encode", b"one", no_cache=True)
            assert isinstance(fut, concurrent.futures.Future)
            assert fut.result(60) == "b25l"
        assert outs == [_b64(x) for x in inputs]
        with pytest.raises(RuntimeError):
            ex.submit("base64.encode", b"after shutdown")


def test_as_completed_yields_each_future_once(home: Path) -> None:
    inputs = [os.urandom(64) for _ in range(60)]
    with Client.from_home(home, timeout=120) as c:
        futs = c.map("base64.encode", inputs, no_cache=True)
        futs.append(c.future("base64.decode", b"@", no_cache=True))
        seen = list(c.as_completed(futs, timeout=120))
        assert len(seen) == len(futs)
        assert {id(f) for f in seen} == {id(f) for f in futs}
        outs = [f.result() for f in seen if f.exception() is None]
        assert sorted(outs) == sorted(_b64(x) for x in inputs)
        assert [type(f.exception()) for f in seen if f.exception() is not None] == [TaskFailed]


def test_close_with_pending_futures_does_not_hang(home: Path, nodes: list[Daemon]) -> None:
    before = len(_io_threads())
    c = Client.from_home(home, timeout=120)
    pending = [c.future("sleep", params={"seconds": 120 + i}, no_cache=True) for i in range(3)]
    ids = [f.id for f in pending]
    _wait_busy(nodes[1], 3)  # the executor's three slots each run one
    assert len(_io_threads()) == before + 1
    c.close()
    assert len(_io_threads()) == before  # the reader thread is joined, not left behind
    for f in pending:
        with pytest.raises(ClientClosed):
            f.result(0)
    with pytest.raises(ClientClosed):
        c.future("base64.encode", b"x")
    # the tasks went on on the node; cancel them so they hold no slot
    with Client.from_home(home) as again:
        for task_id in ids:
            assert again.task(task_id)["state"] == "running"  # on the node, not ended
            again.cancel(task_id)
    _wait_busy(nodes[1], 0)


async def _async_roundtrip(home: Path, executor: Daemon) -> None:
    inputs = [os.urandom(1024) for _ in range(100)]
    async with AsyncClient.from_home(home, timeout=120) as c:
        with anyio.fail_after(120):
            one = c.future("base64.encode", b"abc", no_cache=True)
            assert await one == "YWJj"
            assert one.id is not None
            assert one.done()
            assert (await c.task(one.id))["state"] == "done"
            assert await c.gather(c.map("base64.encode", inputs, no_cache=True)) == \
                [_b64(x) for x in inputs]
            futs = c.map("base64.encode", inputs[:30], no_cache=True)
            seen = [f async for f in c.as_completed(futs)]
            assert len(seen) == 30
            assert {id(f) for f in seen} == {id(f) for f in futs}
            bad = c.future("base64.decode", b"@@", no_cache=True)
            with pytest.raises(TaskFailed, match="invalid base64 character"):
                await bad
            # submit(wait=True) rides the same connection and answers as over HTTP
            rec = await c.submit("base64.encode", b"abc", wait=True, no_cache=True)
            assert rec["state"] == "done"
            assert rec["output"] == "YWJj"
            rec = await c.submit("base64.decode", b"@@", wait=True, no_cache=True)
            assert rec["state"] == "failed"
            assert "invalid base64 character" in rec["error"]
            with pytest.raises(TaskError, match="'where' must be one of"):
                await c.submit("base64.encode", b"abc", wait=True, where="nowhere")
            slow = c.future("sleep", params={"seconds": 120}, no_cache=True)
            task_id = await slow.submitted()
            await _await_busy(executor, 1)
            assert slow.cancel()
            with pytest.raises(TaskCancelled):
                await slow
            assert (await c.task(task_id, wait=60))["state"] == "cancelled"
            await _await_busy(executor, 0)
            left = c.future("sleep", params={"seconds": 122}, no_cache=True)
            left_id = await left.submitted()
            await _await_busy(executor, 1)
    # leaving the block with a future pending settles it, and stops the reader task
    with pytest.raises(ClientClosed):
        await left
    async with AsyncClient.from_home(home) as again:
        await again.cancel(left_id)
    await _await_busy(executor, 0)


async def test_async_client_under_trio(home: Path, nodes: list[Daemon]) -> None:
    await _async_roundtrip(home, nodes[1])


def test_async_client_under_asyncio(home: Path, nodes: list[Daemon]) -> None:
    asyncio.run(_async_roundtrip(home, nodes[1]))


async def test_async_futures_need_the_async_with_block(home: Path) -> None:
    c = AsyncClient.from_home(home)
    with pytest.raises(TeammeshError, match="async with"):
        c.future("base64.encode", b"x")
    await c.__aexit__(None, None, None)


def test_losing_the_node_fails_pending_futures(tmp_path: Path) -> None:
    before = len(_io_threads())
    with mesh(tmp_path, 1, slots=[1]) as (node,):
        c = Client.from_home(node.home, timeout=60)
        futs = [c.future("sleep", params={"seconds": 120}, no_cache=True) for _ in range(2)]
        assert all(f.id for f in futs)
        node.kill9()
        for f in futs:
            with pytest.raises(NodeNotRunning, match="lost the node"):
                f.result(60)
        c.close()
    assert len(_io_threads()) == before



async def test_concurrent_http_submissions_fail_alone(home: Path) -> None:
    """Per-task HTTP requests that arrive together are journaled together (taskapi's
    SubmitGroup); a request the node refuses still fails alone, with its reason."""
    import httpx
    import trio

    c = AsyncClient.from_home(home, timeout=120)
    inputs = [os.urandom(256) for _ in range(30)]
    answers: dict[int, httpx.Response] = {}

    async def post(i: int, body: dict[str, object]) -> None:
        answers[i] = await c._http.post("/v1/tasks", json=body)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i, x in enumerate(inputs):
                nursery.start_soon(post, i, {"kind": "base64.encode", "input_b64": _b64(x),
                                             "no_cache": True, "wait": 60})
            nursery.start_soon(post, -1, {"kind": "base64.encode", "where": "nowhere"})
    await c.__aexit__(None, None, None)
    assert answers[-1].status_code == 422
    assert "'where' must be one of" in answers[-1].json()["error"]["message"]
    for i, x in enumerate(inputs):
        assert answers[i].status_code == 200
        assert answers[i].json()["output"] == _b64(x)
