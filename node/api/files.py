"""Control API routes for files: share, get (NDJSON progress), list, pin, unpin, gc."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from teammesh.node.api.body import json_body
from teammesh.protocols.errors import StorageError, TeammeshError

if TYPE_CHECKING:
    from teammesh.node.files.service import FilesService


def _path(body: dict[str, Any], key: str) -> Path:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise TeammeshError(f"'{key}' (a path on this machine) is required")
    return Path(value)


def files_routes(svc: FilesService, endpoint: Any) -> list[Route]:
    async def share(request: Request) -> Any:
        body = await json_body(request)
        return await svc.share(_path(body, "path"), mirror=bool(body.get("mirror")))

    async def get(request: Request) -> Any:
        body = await json_body(request)
        cid = body.get("cid")
        if not isinstance(cid, str):
            raise TeammeshError("'cid' is required")
        dest = _path(body, "dest")
        send, receive = trio.open_memory_channel[str](64)

        async def work() -> None:
            last = 0.0

            def progress(done: int, total: int) -> None:
                nonlocal last
                now = trio.current_time()
                if now - last >= 0.1:
                    last = now
                    try:
                        send.send_nowait(json.dumps({"progress": done, "total": total}) + "\n")
                    except trio.WouldBlock:
                        pass  # the client is slow to read progress: skip a tick

            hopped = 0.0

            def report(done: int, total: int) -> None:
                # the exporter thread calls this per block: a trip into trio for each one
                # held both threads up, so only a tick that will be shown makes the trip
                nonlocal hopped
                if not _in_thread():
                    progress(done, total)
                    return
                now = time.monotonic()
                if now - hopped >= 0.1 or done == total:
                    hopped = now
                    trio.from_thread.run_sync(progress, done, total)

            async with send:
                try:
                    result = await svc.get(cid, dest, report)
                    await send.send(json.dumps({"done": result}) + "\n")
                except (StorageError, TeammeshError) as exc:
                    await send.send(json.dumps({"error": str(exc)}) + "\n")

        async def stream() -> AsyncIterator[str]:
            async with receive:
                async for line in receive:
                    yield line

        # the transfer runs in the files service's nursery; this response only relays it
        svc.start_job(work)
        return StreamingResponse(stream(), media_type="application/x-ndjson")

    async def listing(request: Request) -> Any:
        return {"files": svc.list_pins(), "store": svc.summary()}

    async def pin(request: Request) -> Any:
        body = await json_body(request)
        return await svc.pin(str(body.get("cid", "")))

    async def unpin(request: Request) -> Any:
        body = await json_body(request)
        return await svc.unpin(str(body.get("cid", "")))

    async def gc(request: Request) -> Any:
        return await svc.gc()

    return [
        Route("/v1/files", endpoint(listing), methods=["GET"]),
        Route("/v1/files/share", endpoint(share), methods=["POST"]),
        Route("/v1/files/get", endpoint(get), methods=["POST"]),
        Route("/v1/files/pin", endpoint(pin), methods=["POST"]),
        Route("/v1/files/unpin", endpoint(unpin), methods=["POST"]),
        Route("/v1/files/gc", endpoint(gc), methods=["POST"]),
    ]


def _in_thread() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return True
    return False
