"""Files service: share, fetch, pin and mirror files by CID.

Every node keeps an embedded block store (storage/blockstore.py) that chunks files exactly
as ``ipfs add --cid-version=1`` does, serves its blocks to members over Bitswap 1.2.0 on
its own libp2p host, and fetches in the configured order (default: local → team peers →
external IPFS → R2 mirror). Blocking store and S3 calls run in worker threads so the trio
loop never stalls; a mirror that is down is retried from a persistent queue and catches
up, losing nothing.

Sizes a DAG claims are believed only up to ``max_file_bytes`` (config ``files.max_file_mb``,
64 GiB by default): a few blocks linked over and over can claim any size. Files reach tasks
by path (``fetch_to_path``/``store_path``, streamed chunk by chunk); ``materialise`` joins a
file in the daemon's memory and so takes only small ones (``MATERIALISE_MAX_BYTES``).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from teammesh.protocols.errors import StorageError, TeammeshError, leaves
from teammesh.protocols.tasks import TaskSpec, is_cid_ref
from teammesh.storage.blockstore import BlockNotFound, FsBlockstore
from teammesh.storage.cid import Cid
from teammesh.storage.mirrorqueue import MirrorQueue
from teammesh.storage.unixfs import (
    DEFAULT_MAX_FILE_BYTES,
    FileExporter,
    FileTooLarge,
    human_bytes,
    over_limit,
)

if TYPE_CHECKING:
    from teammesh.node.p2p.host import MeshHost

logger = logging.getLogger("teammesh.files")

Progress = Callable[[int, int], None]
FETCH_SOURCES = ("local", "peers", "ipfs", "r2")
MIRROR_POLL_S = 5.0
EXPORT_FRESH_BLOCKS = 128  # blocks a get keeps in memory for its exporter (~32 MiB)
MATERIALISE_MAX_BYTES = 64 * 1024 * 1024  # a file joined in the daemon's memory for a task


PROVIDER_DIAL_S = 10.0  # one outside provider's dial (TCP, Noise, yamux)
PROVIDER_RETRY_S = 60.0  # a configured provider that could not be dialed is skipped this long


class NotFound(StorageError):
    pass


class ProviderRefused(StorageError):
    """A provider address that names no peer id, or no outside peer may be asked."""


@dataclasses.dataclass(frozen=True, slots=True)
class Provider:
    """An outside Bitswap peer named by the user: its full multiaddr and its peer id."""

    addr: str
    peer_id: str


def parse_provider(text: str) -> Provider:
    """``/ip4/…/tcp/…/p2p/<peer id>`` as a Provider; the peer id is required, because
    Noise then proves that the blocks come from the peer the user named."""
    addr = text.strip()
    head, sep, peer_id = addr.rpartition("/p2p/")
    if not sep or not head.startswith("/") or not peer_id or "/" in peer_id:
        raise ProviderRefused(
            f"{text[:120]!r} is not a provider address: give the peer's full multiaddr"
            " ending in /p2p/<peer id>, e.g. /ip4/192.0.2.7/tcp/4001/p2p/12D3KooW…"
            " (Helia and Kubo print theirs; the peer id proves who sends the blocks)")
    return Provider(addr, peer_id)


def _providers(cfg: Any) -> list[Provider]:
    """``files.providers``, read only if config knows it."""
    try:
        values = cfg.get("files", "providers")
    except KeyError:
        return []
    return [parse_provider(v) for v in values]


def _nobody(peer: str) -> bool:
    return False


def _max_file_bytes(cfg: Any) -> int:
    """``files.max_file_mb`` (MiB; 0 means the default), read only if config knows it."""
    try:
        mb = int(cfg.get("files", "max_file_mb"))
    except KeyError:
        return DEFAULT_MAX_FILE_BYTES
    return mb * 1024 * 1024 if mb > 0 else DEFAULT_MAX_FILE_BYTES


def parse_cid(text: str) -> Cid:
    try:
        return Cid.parse(text.strip())
    except StorageError as exc:
        raise StorageError(f"{text[:80]!r} is not a CID ({exc})") from exc


class _BlockWriter:
    """Writes fetched blocks to the store on a thread of its own.

    Writing each 256 KiB block on the trio thread took a third of a get's time, during
    which nothing read the network. ``put`` queues (and blocks the caller only while
    ``depth`` blocks wait); the first write error is raised by the next ``put`` and by
    ``check``, and everything queued after it is dropped.
    """

    def __init__(self, put: Callable[[Cid, bytes], None], depth: int = 64) -> None:
        self._put = put
        self._queue: queue.Queue[tuple[Cid, bytes] | None] = queue.Queue(depth)
        self.error: BaseException | None = None

    def put(self, cid: Cid, data: bytes) -> None:
        self.check()
        self._queue.put((cid, data))

    def close(self) -> None:
        self._queue.put(None)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self._put(*item)
                except Exception as exc:  # raised in the fetch by put() or check()
                    self.error = exc


class FilesService:
    """The files of one node.

    Args:
        config: the node's configuration (sections ``files``, ``ipfs``, ``r2``).
        home: the directory holding the block store, the mirror queue and temporary files.
        is_member: whether a peer is a team member (members are asked for blocks and
            served; outsiders only as ``files.allow_peers``/``files.serve`` say).
        admit_peer: lets an outside provider's connection and Bitswap streams through
            the host's gates (its blocks reach us on a stream it opens); None when the
            gates already admit whoever this service may dial.
    """

    def __init__(self, config: Any, home: Path, *, is_member: Callable[[str], bool] = _nobody,
                 admit_peer: Callable[[str], None] | None = None) -> None:
        cfg = config
        self.home = Path(home)
        self.is_member = is_member
        self.admit_peer = admit_peer
        limit_mb = int(cfg.get("files", "limit_mb"))
        self.store = FsBlockstore(self.home / "store",
                                  limit_bytes=limit_mb * 1024 * 1024 if limit_mb else None)
        self.fetch_order = [s for s in cfg.get("files", "fetch_order") if s in FETCH_SOURCES]
        self.max_file_bytes = _max_file_bytes(cfg)
        self.providers = _providers(cfg)
        # configured providers that failed to dial: skipped until then (trio clock), so a
        # provider that is down costs one dial a minute, not one per task input
        self._provider_down: dict[str, float] = {}
        self.allow_peers = frozenset(cfg.get("files", "allow_peers"))
        self.serve_public = cfg.get("files", "serve") == "public"
        self.queue = MirrorQueue(self.home / "mirror-queue.db")
        self.mirror: Any = None
        endpoint = cfg.get("r2", "endpoint")
        if endpoint:
            from teammesh.storage.r2 import R2Mirror

            self.mirror = R2Mirror(endpoint, cfg.get("r2", "bucket"),
                                   cfg.get("r2", "access_key_id"),
                                   cfg.get("r2", "secret_access_key"),
                                   region=cfg.get("r2", "region"), prefix=cfg.get("r2", "prefix"))
        self._bucket_ready = False
        self.kubo_api = cfg.get("ipfs", "api")
        self.bitswap_config: Any = None  # BitswapConfig; None: its defaults
        self.kubo: Any = None
        self.bitswap: Any = None
        self.host: MeshHost | None = None
        self._mirror_wake = trio.Event()
        self._jobs_send, self._jobs_receive = trio.open_memory_channel[
            Callable[[], Awaitable[None]]](16)
        self.mirror_state = "not configured" if self.mirror is None else "unknown"
        self.stats = {"shared": 0, "fetched_local": 0, "fetched_peers": 0, "fetched_ipfs": 0,
                      "fetched_r2": 0, "mirrored": 0, "mirror_failures": 0}

    def may_serve(self, peer: str) -> bool:
        """Whether ``peer``'s wantlists are answered: members, and outsiders as
        ``files.serve``/``files.allow_peers`` say (a provider we fetch from is not served
        for that alone)."""
        return self.serve_public or peer in self.allow_peers or self.is_member(peer)

    # --- store helpers (threads) --------------------------------------------------------
    def get_block(self, cid: Cid) -> bytes | None:
        try:
            return self.store.get(cid)
        except (BlockNotFound, StorageError):
            return None

    def put_block(self, cid: Cid, data: bytes) -> None:
        # only Bitswap calls this, with blocks whose CIDs it rebuilt by hashing them
        self.store.put(cid, data, verified=True)

    def has_file(self, root: Cid) -> bool:
        """Whether every block of ``root`` is stored. Walks distinct blocks only (a file
        of one block linked a million times costs one read); export checks the sizes."""
        try:
            return not self.store.missing(root)
        except StorageError:
            return False

    # --- operations ---------------------------------------------------------------------
    async def share(self, path: Path, *, mirror: bool) -> dict[str, Any]:
        path = path.expanduser().resolve()
        if not path.is_file():
            raise StorageError(f"{path} is not a file")
        t0 = time.monotonic()
        root, size = await trio.to_thread.run_sync(self.store.add_file, path)
        self.stats["shared"] += 1
        out: dict[str, Any] = {"cid": str(root), "size": size, "path": str(path),
                               "seconds": round(time.monotonic() - t0, 3), "mirror": None,
                               "ipfs": None}
        if mirror:
            if self.mirror is None:
                raise StorageError("no R2 mirror configured: set [r2] endpoint, bucket and"
                                   " credentials (or TEAMMESH_R2_* variables)")
            self.queue.enqueue(root, path)
            self._mirror_wake.set()
            out["mirror"] = "queued"
        if self.kubo is not None:
            try:
                await self.kubo.add_file(path)
                out["ipfs"] = "added"
            except StorageError as exc:
                out["ipfs"] = f"skipped: {exc}"
        return out

    async def get(self, text: str, dest: Path, progress: Progress | None = None,
                  peers: list[str] | None = None,
                  providers: list[str] | None = None) -> dict[str, Any]:
        """Fetch ``text`` (a CID) into ``dest``, trying each source in order.

        ``providers`` are outside Bitswap peers (multiaddrs with /p2p/) asked with the
        team and ``files.providers`` at the "peers" step, for this call only.
        """
        root = parse_cid(text)
        extra = [parse_provider(p) for p in providers or []]
        dest = dest.expanduser().resolve()
        if dest.is_dir():
            dest = dest / str(root)
        errors: list[str] = []
        for source in self.fetch_order:
            try:
                if source == "local":
                    if not await trio.to_thread.run_sync(self.has_file, root):
                        errors.append("local: not in this node's store")
                        continue
                elif source == "peers":
                    size = await self._fetch_and_export(root, peers, dest, progress, extra)
                    self.stats["fetched_peers"] += 1
                    return {**self._done(root, dest, source), "size": size}
                elif source == "ipfs":
                    if self.kubo is None:
                        continue
                    await self.kubo.cat_to(str(root), dest,
                                           max_bytes=self.max_file_bytes)
                    self.stats["fetched_ipfs"] += 1
                    return self._done(root, dest, "ipfs")
                elif source == "r2":
                    if self.mirror is None:
                        continue
                    await self._fetch_from_mirror(root, dest, progress)
                    return self._done(root, dest, "r2")
            except FileTooLarge as exc:  # the same CID is the same size from every source
                raise FileTooLarge(
                    f"cannot get {root}: {exc}. A file is refused when it claims more than"
                    " this node's limit (files.max_file_mb): a few blocks linked over and"
                    " over can claim any size", size=exc.size, limit=exc.limit) from None
            except (StorageError, TeammeshError) as exc:
                errors.append(f"{source}: {exc}")
                continue
            size = await trio.to_thread.run_sync(
                lambda: self.store.export(root, dest, progress, max_size=self.max_file_bytes))
            self.stats[f"fetched_{source}"] += 1
            return {**self._done(root, dest, source), "size": size}
        raise NotFound(f"cannot get {root}: " + "; ".join(errors or ["no source configured"]))

    def _done(self, root: Cid, dest: Path, source: str) -> dict[str, Any]:
        return {"cid": str(root), "path": str(dest), "source": source,
                "size": dest.stat().st_size}

    async def _fetch_and_export(self, root: Cid, peers: list[str] | None, dest: Path,
                                progress: Progress | None,
                                providers: list[Provider] | None = None) -> int:
        """Fetch over Bitswap and write ``dest`` at the same time.

        The exporter (a thread) walks the file in order while Bitswap brings blocks in
        roughly that order; it waits for a block still in flight. Writing the file after
        the fetch instead took a sixth of a 256 MiB get.
        """
        arrived = threading.Condition()
        over = False
        # blocks handed to the exporter in memory: reading each back from disk and hashing
        # it again cost the exporter as much as the write; bounded, the rest go via disk
        fresh: dict[Cid, bytes] = {}

        def get_block(cid: Cid) -> bytes:
            while True:
                with arrived:
                    data = fresh.pop(cid, None)
                if data is not None:
                    return data
                try:
                    return self.store.get(cid)
                except BlockNotFound:
                    with arrived:
                        if cid in fresh:
                            continue
                        if over:
                            raise
                        arrived.wait(0.25)

        def put_block(cid: Cid, data: bytes) -> None:
            self.put_block(cid, data)
            with arrived:
                if len(fresh) < EXPORT_FRESH_BLOCKS:
                    fresh[cid] = data
                arrived.notify_all()

        size = 0
        fetch_error: BaseException | None = None
        export_error: BaseException | None = None

        async def export() -> None:
            nonlocal size, export_error
            try:
                size = await trio.to_thread.run_sync(
                    lambda: self.store.export(root, dest, progress, get_block=get_block,
                                              max_size=self.max_file_bytes))
            except TeammeshError as exc:
                export_error = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(export)
            try:
                await self._fetch_from_peers(root, peers, None, put_block=put_block,
                                             providers=providers)
            except TeammeshError as exc:
                fetch_error = exc  # raised below, not from the nursery (an ExceptionGroup)
            finally:
                with arrived:
                    over = True
                    arrived.notify_all()
        if fetch_error is not None:
            raise fetch_error
        if export_error is not None:
            raise export_error
        return size

    async def _fetch_from_peers(self, root: Cid, peers: list[str] | None,
                                progress: Progress | None,
                                put_block: Callable[[Cid, bytes], None] | None = None,
                                max_bytes: int | None = None,
                                providers: list[Provider] | None = None) -> None:
        """Fetch ``root`` over Bitswap into the store and pin it; a file claiming more than
        ``max_bytes`` (default ``max_file_bytes``) is refused at its root block.

        Asked: ``peers``, the connected team members, and the outside providers
        (``files.providers`` and ``providers``), which are dialed here and nowhere else.
        """
        if self.bitswap is None or self.host is None:
            raise StorageError("bitswap is not running")
        candidates = list(peers or [])
        for p in self.host.connected_peers():
            if p not in candidates and self.is_member(p):
                candidates.append(p)
        now = trio.current_time()
        configured = [prov for prov in self.providers
                      if self._provider_down.get(prov.peer_id, 0.0) <= now]
        outside, dial_errors = await self._dial_providers([*configured, *(providers or [])])
        for prov in configured:
            if prov.peer_id not in outside:
                self._provider_down[prov.peer_id] = now + PROVIDER_RETRY_S
        candidates += [p for p in outside if p not in candidates]
        if not candidates:
            if not dial_errors and self.providers and not providers:
                raise StorageError(
                    "no team peer is connected and no provider in files.providers could be"
                    f" reached in the last {PROVIDER_RETRY_S:g} s (they are dialed again"
                    " after that); give one with --from to try now")
            if dial_errors:
                raise StorageError("no team peer is connected and no provider could be"
                                   " reached: " + "; ".join(dial_errors))
            raise StorageError(
                "no team peer is connected and no provider is set: to fetch from an IPFS"
                " peer outside the team, give its address (`teammesh get CID --from"
                " /ip4/…/tcp/…/p2p/<peer id>`) or list it in files.providers")
        strict = [p for p in outside if not self.is_member(p)]
        # blocks written inside a writing() session are safe from a concurrent gc until
        # the pin that follows protects them
        with self.store.writing():
            writer = _BlockWriter(put_block or self.put_block)
            fetch_error: TeammeshError | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, writer.run)
                try:
                    await self.bitswap.fetch(
                        root, candidates, writer.put,
                        max_bytes=self.max_file_bytes if max_bytes is None else max_bytes,
                        strict=strict)
                except TeammeshError as exc:
                    fetch_error = exc  # raised below as itself, not in an ExceptionGroup
                finally:
                    writer.close()  # the thread writes what is queued, then ends
            if fetch_error is not None:
                raise fetch_error
            writer.check()
            await trio.to_thread.run_sync(self.store.pin, root)

    async def _dial_providers(self, providers: list[Provider]) -> tuple[list[str], list[str]]:
        """Connect to each provider not yet connected (in parallel, PROVIDER_DIAL_S each):
        (the peer ids reached, what went wrong with the others)."""
        assert self.host is not None
        host = self.host
        reached: list[str] = []
        errors: list[str] = []

        async def dial(p: Provider) -> None:
            if self.admit_peer is not None:
                self.admit_peer(p.peer_id)
            if not host.is_connected(p.peer_id):
                try:
                    with trio.fail_after(PROVIDER_DIAL_S):
                        await host.connect(p.addr)
                except trio.TooSlowError:
                    errors.append(f"{p.addr}: no answer within {PROVIDER_DIAL_S:g} s")
                    return
                except TeammeshError as exc:
                    errors.append(f"{p.addr}: {exc}")
                    return
            if p.peer_id not in reached:
                reached.append(p.peer_id)

        unique = list({p.peer_id: p for p in providers}.values())
        async with trio.open_nursery() as nursery:
            for p in unique:
                nursery.start_soon(dial, p)
        return reached, errors

    async def _fetch_from_mirror(self, root: Cid, dest: Path, progress: Progress | None,
                                 max_bytes: int | None = None) -> None:
        done = 0
        limit = self.max_file_bytes if max_bytes is None else max_bytes

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, 0)

        await trio.to_thread.run_sync(
            lambda: self.mirror.download(root, dest, tick, max_bytes=limit))
        self.stats["fetched_r2"] += 1
        # keep a local copy so this node can serve it to the team next time
        try:
            await trio.to_thread.run_sync(self.store.add_file, dest)
        except StorageError as exc:
            logger.warning("fetched %s from the mirror but could not store it: %s", root, exc)

    # --- tasks with files ------------------------------------------------------------------
    async def _ensure_local(self, root: Cid, peers: list[str], max_bytes: int) -> None:
        """Bring every block of ``root`` into the store (peers, then the mirror)."""
        if await trio.to_thread.run_sync(self.has_file, root):
            return
        try:
            await self._fetch_from_peers(root, peers, None, max_bytes=max_bytes)
        except FileTooLarge:
            raise
        except StorageError:
            if self.mirror is None:
                raise
            with tempfile.TemporaryDirectory(dir=self.home) as tmp:
                await self._fetch_from_mirror(root, Path(tmp) / "f", None, max_bytes)

    async def fetch_to_path(self, cid_text: str, dest: Path, peers: list[str],
                            max_bytes: int) -> int:
        """Write file ``cid_text`` to ``dest`` chunk by chunk, fetching it first if needed.

        Memory stays flat whatever the size: blocks go to the store, then from the store
        to ``dest`` (via ``dest.partial``, renamed when complete).

        Args:
            cid_text: the file's CID.
            dest: the path to write (its directory must exist).
            peers: peers to ask first (connected team members are asked too).
            max_bytes: refuse a file that claims more, before fetching past its root.

        Returns:
            The file's size in bytes.

        Raises:
            FileTooLarge: the file claims more than ``max_bytes`` (the message names it).
            StorageError: not a CID, no source has it, or it is malformed.
        """
        root = parse_cid(cid_text)
        await self._ensure_local(root, peers, max_bytes)
        return await trio.to_thread.run_sync(
            lambda: self.store.export(root, Path(dest), max_size=max_bytes))

    async def store_path(self, path: Path) -> dict[str, Any]:
        """Add the file at ``path`` to the block store, pinned, reading it 4 MiB at a time.

        Returns:
            ``{"$cid": str, "size": int}``, the form a task result carries a file in.

        Raises:
            StorageError: ``path`` is not a file, or the store is full.
        """
        path = Path(path)
        if not path.is_file():
            raise StorageError(f"{path} is not a file")
        root, size = await trio.to_thread.run_sync(self.store.add_file, path)
        return {"$cid": str(root), "size": size}

    async def materialise(self, text: str, peers: list[str],
                          max_bytes: int = MATERIALISE_MAX_BYTES) -> bytes:
        """The bytes of file ``text`` for a task, fetched into the store if needed.

        The whole file is joined in the daemon's memory, so only files up to
        ``max_bytes`` are taken; larger ones must go to the kind by path
        (``fetch_to_path``).

        Raises:
            FileTooLarge: the file claims more than ``max_bytes``.
            StorageError: not a CID, no source has it, or it is malformed.
        """
        root = parse_cid(text)
        try:
            await self._ensure_local(root, peers, max_bytes)
            return await trio.to_thread.run_sync(
                lambda: b"".join(FileExporter(root, self.store.get, max_size=max_bytes)))
        except FileTooLarge as exc:
            raise FileTooLarge(
                f"file {root} is {human_bytes(exc.size)}, over the {human_bytes(max_bytes)}"
                " a task can take in the daemon's memory; the kind should take the file by"
                " path (fetch_to_path)", size=exc.size, limit=max_bytes) from None

    async def resolve_spec(self, spec: TaskSpec, peers: list[str]) -> TaskSpec:
        """Replace a task's input CID and {"$cid": ...} params with the files' bytes."""
        data = spec.input
        if spec.input_cid is not None:
            data = await self.materialise(spec.input_cid, peers)
        params = dict(spec.params)
        for key, value in spec.params.items():
            if is_cid_ref(value):
                params[key] = await self.materialise(value["$cid"], peers)
        return dataclasses.replace(spec, input=data, params=params, input_cid=None)

    async def store_output(self, data: bytes) -> dict[str, Any]:
        """Keep a large output as a file; the result carries its CID instead."""
        def add() -> tuple[Cid, int]:
            with tempfile.NamedTemporaryFile(dir=self.home) as f:
                f.write(data)
                f.flush()
                return self.store.add_file(Path(f.name))

        root, size = await trio.to_thread.run_sync(add)
        return {"$cid": str(root), "size": size}

    def list_pins(self) -> list[dict[str, Any]]:
        out = []
        for root in self.store.pins():
            try:
                size = self.store.file_size(root)
            except StorageError:
                size = None
            out.append({"cid": str(root), "size": size})
        return out

    async def pin(self, text: str, max_bytes: int | None = None) -> dict[str, Any]:
        """Keep file ``text`` in the store, fetching it from peers first if needed.

        Args:
            text: the file's CID.
            max_bytes: refuse a file that claims more (checked at its root block, before
                any other block is fetched); ``files.max_file_mb`` when None, and never
                more than that.

        Raises:
            FileTooLarge: the file claims more than the limit.
            StorageError: not a CID, or no peer has it.
        """
        root = parse_cid(text)
        limit = self.max_file_bytes if max_bytes is None else min(max_bytes,
                                                                  self.max_file_bytes)
        if not await trio.to_thread.run_sync(self.has_file, root):
            await self._fetch_from_peers(root, None, None, max_bytes=limit)
        size = await trio.to_thread.run_sync(self.store.file_size, root)
        if size > limit:
            raise over_limit(root, size, limit)
        await trio.to_thread.run_sync(self.store.pin, root)
        return {"cid": str(root), "pinned": True}

    async def unpin(self, text: str) -> dict[str, Any]:
        root = parse_cid(text)
        ok = await trio.to_thread.run_sync(self.store.unpin, root)
        return {"cid": str(root), "pinned": False, "was_pinned": ok}

    async def gc(self) -> dict[str, Any]:
        freed = await trio.to_thread.run_sync(self.store.gc)
        return {"freed_bytes": freed, "used_bytes": self.store.size_bytes,
                "limit_bytes": self.store.limit_bytes}

    def summary(self) -> dict[str, Any]:
        return {"used_bytes": self.store.size_bytes, "limit_bytes": self.store.limit_bytes,
                "pins": len(self.store.pins()), "mirror": self.mirror_state,
                "mirror_pending": len(self.queue.pending()), "fetch_order": self.fetch_order,
                "bad_blocks": dict(self.bitswap.bad_blocks) if self.bitswap else {},
                "corrupt_local_blocks": self.store.corrupt_blocks, **self.stats}

    # --- service ------------------------------------------------------------------------
    async def run(self, host: MeshHost, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.host = host
        async with trio.open_nursery() as nursery:
            from teammesh.node.files.bitswap import BitswapService

            self.bitswap = BitswapService(host, self.get_block, self.put_block,
                                          config=self.bitswap_config,
                                          may_serve=self.may_serve)
            await nursery.start(self.bitswap.run)
            if self.mirror is not None:
                nursery.start_soon(self._mirror_loop)
            task_status.started()
            async with self._jobs_receive:
                async for job in self._jobs_receive:
                    nursery.start_soon(job)

    def start_job(self, job: Callable[[], Awaitable[None]]) -> None:
        """Run a transfer for an API request or a task in this service's nursery."""

        async def guarded() -> None:
            try:
                await job()
            except* TeammeshError as group:  # a failed transfer must not stop the service
                logger.warning("file job failed: %s", "; ".join(map(str, leaves(group))))

        try:
            self._jobs_send.send_nowait(guarded)
        except trio.WouldBlock as exc:
            raise TeammeshError("too many transfers in progress; try again shortly") from exc

    async def _mirror_loop(self) -> None:
        """Drain the persistent upload queue; back off while the mirror is down."""
        while True:
            items = self.queue.due(time.time())
            for item in items:
                try:
                    await trio.to_thread.run_sync(self._upload, item)
                except StorageError as exc:
                    self.queue.failed(item.cid, str(exc), time.time())
                    self.stats["mirror_failures"] += 1
                    if self.mirror_state != "down":
                        logger.warning("R2 mirror unavailable (%s); uploads wait in the queue",
                                       exc)
                    self.mirror_state = "down"
                    break
                self.queue.done(item.cid)
                self.stats["mirrored"] += 1
                if self.mirror_state != "up":
                    logger.info("R2 mirror reachable; %d uploads pending",
                                len(self.queue.pending()))
                self.mirror_state = "up"
            with trio.move_on_after(MIRROR_POLL_S):
                await self._mirror_wake.wait()
            self._mirror_wake = trio.Event()
        self._jobs_send, self._jobs_receive = trio.open_memory_channel[
            Callable[[], Awaitable[None]]](16)

    def _upload(self, item: Any) -> None:
        if not self._bucket_ready:
            self.mirror.ensure_bucket()
            self._bucket_ready = True
        path = Path(item.path)
        if path.is_file():
            self.mirror.upload_file(item.cid, path)
            return
        # the original moved or was deleted: upload from our own verified copy
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "file"
            self.store.export(item.cid, copy)
            self.mirror.upload_file(item.cid, copy)


async def fetch_from_providers(config: Any, text: str, dest: Path, providers: list[str],
                               progress: Progress | None = None) -> dict[str, Any]:
    """Fetch file ``text`` from outside Bitswap peers, in this process; no node needed.

    What ``teammesh get --from`` runs. The peers are the ones named and nobody else: the
    host dials only their addresses, its gates admit only their peer ids (Noise proves
    them) and only on Bitswap, and it serves no one. It has a throwaway identity, so
    the node's peer id is not shown to outsiders, and a throwaway block store next to
    ``dest``: each block is checked against its CID before it is kept, the file is
    written to ``dest`` as it arrives, and the blocks go when it is done. A file that
    claims more than ``files.max_file_mb`` is refused at its root block.

    Raises:
        ProviderRefused: no provider, or one without a /p2p/ peer id.
        FileTooLarge: the file claims more than ``files.max_file_mb``.
        BadBlockFrom: a provider sent a block that matches no CID asked for.
        StorageError: not a CID, no provider could be reached, or none has the file.
    """
    import os

    from teammesh.node.files.bitswap import BitswapConfig
    from teammesh.node.p2p.host import open_host
    from teammesh.protocols.bitswap import BITSWAP_PROTOCOLS

    named = [parse_provider(p) for p in providers]
    if not named:
        raise ProviderRefused("no provider given: name one with --from /ip4/…/tcp/…/p2p/<peer"
                              " id> or list them in files.providers")
    root = parse_cid(text)
    dest = dest.expanduser().resolve()
    if dest.is_dir():
        dest = dest / str(root)
    allowed = frozenset(p.peer_id for p in named)

    def peer_gate(peer: str) -> bool:
        return peer in allowed

    def stream_gate(peer: str, protocol: str) -> bool:
        return peer in allowed and protocol in BITSWAP_PROTOCOLS

    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".teammesh-get-") as tmp:
        svc = FilesService(config, Path(tmp))
        svc.fetch_order = ["peers"]
        svc.providers = []  # the caller passes the ones to use
        svc.mirror = None  # nothing of this fetch goes anywhere but ``dest``
        svc.bitswap_config = BitswapConfig(serve=False)
        try:
            async with open_host(os.urandom(32), [], peer_gate=peer_gate,
                                 stream_gate=stream_gate, gossip=False) as host, \
                    trio.open_nursery() as nursery:
                await nursery.start(svc.run, host)
                try:
                    t0 = trio.current_time()
                    result = await svc.get(str(root), dest, progress,
                                           providers=[p.addr for p in named])
                    seconds = trio.current_time() - t0
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            svc.queue.close()
    return {**result, "source": "providers", "providers": [p.addr for p in named],
            "seconds": round(seconds, 3)}
