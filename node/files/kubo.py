"""An external IPFS node (Kubo, or anything speaking the Kubo RPC API) as a storage back end.

For users who already run Kubo: ``[ipfs] api = "/ip4/127.0.0.1/tcp/5001"`` in the config
makes teammesh add, fetch and pin files through that node's RPC API::

    async with open_kubo("/ip4/127.0.0.1/tcp/5001") as kubo:
        cid = await kubo.add_file("model.bin")   # pinned; same CID as ours
        await kubo.cat_to(cid, "copy.bin")      # streamed, checked, then renamed

The client is aioipfs (an asyncio library). ``open_kubo`` opens a trio-asyncio loop for
the duration of the ``async with`` and creates the ``AsyncIPFS`` client inside it; every
method is a trio coroutine that runs one asyncio coroutine through ``aio_as_trio``.

Invariants:

* **Same CIDs as ours.** ``add_file`` always sends ``cid-version=1``, ``raw-leaves=true``
  and ``chunker=size-262144``, so the node's configured defaults (Kubo's
  ``Import.*`` settings, a ``legacy-cid-v0`` profile) cannot change the result; the CID
  that comes back is compared with :func:`teammesh.storage.unixfs.cid_of_file` as a
  decoded :class:`~teammesh.storage.cid.Cid` (js-ipfs prints base58btc ``zdj7...``, Kubo
  base32 ``bafy...``: the strings differ, the CIDs do not).
* **Nothing unverified lands at the destination.** ``cat_to`` streams into
  ``<dest>.partial``, hashes it, and only then renames it over ``dest``.
* **A configured but dead node never stalls us.** Connecting is bounded by
  ``CONNECT_TIMEOUT_S``; a refused or timed-out connection raises :class:`KuboUnavailable`
  (one line, naming the address) well under 3 s. :class:`KuboWatch` turns the stream of
  failures into one "is down; carrying on without it" log line, and one more when the
  node is back.

Errors (all ``StorageError``)::

    StorageError
    └── KuboError            the node answered with an error, or something else failed
        ├── KuboUnavailable  no answer at the configured address
        └── KuboCidMismatch  the node's CID or bytes do not match what we compute
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import trio
from teammesh.protocols.errors import ConfigError, StorageError, leaves
from teammesh.storage.cid import Cid
from teammesh.storage.unixfs import CHUNK_SIZE, FileImporter, cid_of_file, over_limit

__all__ = [
    "CONNECT_TIMEOUT_S",
    "KuboBackend",
    "KuboCidMismatch",
    "KuboError",
    "KuboUnavailable",
    "KuboWatch",
    "open_kubo",
]

logger = logging.getLogger("teammesh.kubo")

CONNECT_TIMEOUT_S: Final = 2.0  # TCP connect to the RPC API; keeps "down" answers < 3 s
READ_IDLE_TIMEOUT_S: Final = 120.0  # no byte from the node for this long = it is stuck
PROBE_TIMEOUT_S: Final = 2.5  # whole is_up() round trip
WATCH_INTERVAL_S: Final = 10.0  # KuboWatch.run() polling period
CAT_BUFFER_BYTES: Final = 1 << 20  # bytes gathered on the asyncio side per file write
CHUNKER: Final = f"size-{CHUNK_SIZE}"
HASH_READ_BYTES: Final = 4 << 20  # file read size while hashing in a thread


class KuboError(StorageError):
    """The external IPFS node failed a request (or answered with an error)."""


class KuboUnavailable(KuboError):
    """Nothing answers at the configured RPC API address."""


class KuboCidMismatch(KuboError):
    """The node's CID, or the bytes it returned, do not match the CID we compute."""


class KuboWatch:
    """Turns per-call outcomes into state-change log lines: one when the node goes down,
    one when it comes back; never one per failed call.

    :class:`KuboBackend` reports every call's outcome here; :meth:`run` can also poll.
    """

    def __init__(self, address: str, *, log: logging.Logger = logger) -> None:
        self.address = address
        self._log = log
        self._up: bool | None = None  # None: not known yet

    @property
    def up(self) -> bool | None:
        """Whether the last call reached the node (``None`` before the first call)."""
        return self._up

    def saw_down(self, reason: str) -> None:
        """Record a failed call; logs only when the node was up or unknown before."""
        if self._up is not False:
            self._log.warning(
                "external IPFS at %s is down; carrying on without it (%s)", self.address, reason
            )
        self._up = False

    def saw_up(self) -> None:
        """Record a successful call; logs only when the node was down before."""
        if self._up is False:
            self._log.warning("external IPFS at %s is back", self.address)
        self._up = True

    async def run(
        self,
        kubo: KuboBackend,
        *,
        interval_s: float = WATCH_INTERVAL_S,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Poll ``kubo.is_up()`` every ``interval_s`` until cancelled (state goes to this watch)."""
        await kubo.is_up()
        task_status.started(self)
        while True:
            await trio.sleep(interval_s)
            await kubo.is_up()


class KuboBackend:
    """Files in an external IPFS node, through its Kubo RPC API. Get one from :func:`open_kubo`.

    Every method is a trio coroutine and may raise :class:`KuboUnavailable` (node down)
    or :class:`KuboError` (node answered with an error).
    """

    def __init__(self, address: str, client: Any, watch: KuboWatch) -> None:
        # client: an aioipfs.AsyncIPFS created inside the trio-asyncio loop.
        self.address = address
        self.watch = watch
        self._ipfs = client

    # -- public API -----------------------------------------------------------------------

    async def add_file(self, path: str | os.PathLike[str], *, verify: bool = True) -> str:
        """Add and pin the file at ``path``; return its CID as the node printed it.

        Args:
            path: a regular file.
            verify: also hash the file ourselves (in a thread, while the node works) and
                check both CIDs name the same DAG.
        Returns:
            The CID string (base32 from Kubo, base58btc ``zdj7...`` from js-ipfs); parse it
            with ``Cid.parse`` before comparing.
        Raises:
            FileNotFoundError, IsADirectoryError: ``path`` is not a regular file.
            KuboUnavailable, KuboError, KuboCidMismatch.
        """
        path = Path(path)
        if not path.is_file():
            if path.is_dir():
                raise IsADirectoryError(f"{path} is a directory; add_file takes one file")
            raise FileNotFoundError(f"no such file: {path}")
        ours: list[Cid] = []
        try:
            async with trio.open_nursery() as nursery:
                if verify:

                    async def hash_ours() -> None:
                        ours.append(await trio.to_thread.run_sync(_hash_file, path))

                    nursery.start_soon(hash_ours)
                text = str(await self._call("add", self._aio_add, str(path)))
        except BaseExceptionGroup as group:
            raise _sole(group) from None
        try:
            theirs = Cid.parse(text)
        except StorageError as e:
            raise KuboError(f"external IPFS at {self.address} returned a bad CID: {e}") from None
        if verify and theirs.to_v1() != ours[0]:
            raise KuboCidMismatch(
                f"external IPFS at {self.address} named {path} {text} but teammesh computes "
                f"{ours[0]}: the node does not follow Kubo's add defaults"
            )
        return text

    async def cat_to(
        self,
        cid: str | Cid,
        dest: str | os.PathLike[str],
        *,
        verify: bool = True,
        max_bytes: int | None = None,
    ) -> None:
        """Fetch the file ``cid`` into ``dest``, streaming through ``<dest>.partial``.

        The partial file is hashed with teammesh's importer (CIDv0 layout for ``Qm...``,
        CIDv1 raw leaves otherwise) and renamed over ``dest`` only when it matches.

        Args:
            cid: any CID string (base32, base58btc, ``Qm...``) or a ``Cid``.
            dest: the final path; its directory must exist.
            verify: ``False`` skips the check (for content added with another chunker or
                layout, which our importer cannot reproduce).
            max_bytes: stop once the file runs past this many bytes (the IPFS network's
                files are anyone's: one can claim or stream any size).
        Raises:
            FileTooLarge: more than ``max_bytes`` arrived; nothing is left at ``dest``.
            KuboUnavailable, KuboError (e.g. unknown CID), KuboCidMismatch (the bytes do
            not hash to ``cid``; nothing is left at ``dest``), StorageError (bad CID).
        """
        want = cid if isinstance(cid, Cid) else Cid.parse(cid)
        dest = Path(dest)
        partial = dest.with_name(dest.name + ".partial")
        written = 0
        try:
            async with await trio.open_file(partial, "wb") as f:

                async def write(buf: bytes) -> None:
                    nonlocal written
                    written += len(buf)
                    if max_bytes is not None and written > max_bytes:
                        raise over_limit(want, written, max_bytes)  # "at least", as it stops
                    await f.write(buf)

                # trio_as_aio: the asyncio side hands each buffer to this trio coroutine,
                # so the file is written by trio's thread pool, never inside the loop.
                await self._call("cat", self._aio_cat, str(want), write)
            if verify:
                got = await trio.to_thread.run_sync(
                    lambda: cid_of_file(partial, cid_version=want.version)
                )
                if got != want:
                    raise KuboCidMismatch(
                        f"external IPFS at {self.address} returned bytes for {want} that hash "
                        f"to {got}; discarded (if it was added with another chunker, "
                        "use verify=False)"
                    )
            await trio.Path(partial).replace(dest)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: partial.unlink(missing_ok=True))
            raise

    async def pin(self, cid: str | Cid) -> None:
        """Pin ``cid`` (recursively) on the node, fetching it first if needed.

        Raises:
            KuboUnavailable, KuboError.
        """
        await self._call("pin", self._aio_pin, str(cid))

    async def version(self) -> str:
        """The node's version number (``"0.29.0"`` for Kubo, ``"0.18.1"`` for js-ipfs).

        Raises:
            KuboUnavailable, KuboError.
        """
        return str(await self._call("version", self._aio_version))

    async def is_up(self) -> bool:
        """True when the node answers ``version`` within ``PROBE_TIMEOUT_S``. Never raises
        ``KuboError``; the outcome is reported to :attr:`watch` like any call's."""
        with trio.move_on_after(PROBE_TIMEOUT_S):
            try:
                await self.version()
            except KuboError:
                return False
            return True
        self.watch.saw_down(f"no answer within {PROBE_TIMEOUT_S:g} s")
        return False

    # -- plumbing: trio side --------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run the asyncio coroutine function ``fn(*args)`` and translate its failures."""
        import aiohttp  # type: ignore[import-untyped,unused-ignore]
        import aioipfs  # type: ignore[import-untyped,unused-ignore]
        import trio_asyncio  # type: ignore[import-untyped,unused-ignore]

        try:
            result = await trio_asyncio.aio_as_trio(fn)(*args)
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aioipfs.IPFSConnectionError, _NoAnswer) as e:
            reason = _describe(e)
            self.watch.saw_down(reason)
            raise KuboUnavailable(
                f"external IPFS at {self.address} is not answering ({what}: {reason}); "
                "is the daemon running? ([ipfs] api in the config)"
            ) from None
        except aioipfs.APIError as e:
            self.watch.saw_up()  # it answered, so it is up
            msg = e.message or (e.code if isinstance(e.code, str) else type(e).__name__)
            raise KuboError(f"external IPFS at {self.address} refused {what}: {msg}") from None
        except aioipfs.RPCAccessDenied as e:
            self.watch.saw_up()
            raise KuboError(
                f"external IPFS at {self.address} denied {what} ({e}); "
                "check API.Authorizations in its config"
            ) from None
        self.watch.saw_up()
        return result

    # -- plumbing: asyncio side (these run inside the trio-asyncio loop) ------------------

    async def _aio_add(self, path: str) -> str:
        last: dict[str, Any] | None = None
        async for entry in self._ipfs.core.add(
            path, cid_version=1, raw_leaves=True, chunker=CHUNKER, pin=True
        ):
            last = entry
        if not last or "Hash" not in last:
            raise _NoAnswer("add returned no entry")
        return str(last["Hash"])

    async def _aio_cat(self, cid: str, write: Callable[[bytes], Awaitable[Any]]) -> None:
        import trio_asyncio

        # aioipfs' core.cat() buffers the whole file; stream from its session instead.
        write_aio = trio_asyncio.trio_as_aio(write)
        api = self._ipfs.core
        async with self._ipfs.session.post(
            api.url("cat"), params={"arg": cid}, auth=self._ipfs.auth
        ) as resp:
            if resp.status >= 400:
                api.handle_error(resp, await resp.read())
            buf = bytearray()
            async for piece in resp.content.iter_any():
                buf += piece
                if len(buf) >= CAT_BUFFER_BYTES:
                    await write_aio(bytes(buf))
                    buf.clear()
            if buf:
                await write_aio(bytes(buf))
            # Kubo reports errors met after the headers in a trailer; aiohttp cannot read
            # trailers, but the CID check in cat_to catches any truncation.

    async def _aio_pin(self, cid: str) -> None:
        async for _ in self._ipfs.pin.add(cid, recursive=True, progress=False):
            pass

    async def _aio_version(self) -> str:
        info = await self._ipfs.core.version()
        if info is None:  # aioipfs' post() returns None on connection errors
            raise _NoAnswer("connection failed")
        return str(info.get("Version", "?"))


def _hash_file(path: Path) -> Cid:
    """``cid_of_file(path)`` for a worker thread: stops early when the trio caller is
    cancelled (e.g. the node is down and the add failed), so a big file is not hashed in vain.
    """
    imp = FileImporter(cid_version=1, keep_blocks=False)
    buf = bytearray(HASH_READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            trio.from_thread.check_cancelled()
            imp.feed(view[:n])
    return imp.finish()[0]


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error in a nursery's group (a failed add cancels the hash thread), so
    callers can ``except KuboUnavailable``; the group itself when there are several."""
    real = [e for e in leaves(group) if not isinstance(e, trio.Cancelled)]
    return real[0] if len(real) == 1 else group


class _NoAnswer(Exception):
    """aioipfs swallowed a connection error (its ``post`` returns ``None``)."""


def _describe(e: BaseException) -> str:
    """One short line for a connection failure."""
    import aioipfs

    if isinstance(e, asyncio.TimeoutError):
        return str(e) or f"timed out (connect limit {CONNECT_TIMEOUT_S:g} s)"
    oserr = getattr(e, "os_error", None)
    if isinstance(oserr, OSError) and oserr.errno:
        return os.strerror(oserr.errno).lower()
    if isinstance(e, _NoAnswer | aioipfs.IPFSConnectionError):
        return "cannot connect"  # aioipfs hides the OS error in these cases
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


@asynccontextmanager
async def open_kubo(api: str, *, watch: KuboWatch | None = None) -> AsyncIterator[KuboBackend]:
    """Open a client for the Kubo RPC API at multiaddr ``api`` (``/ip4/H/tcp/P``).

    Opens a trio-asyncio loop for the duration. Does not contact the node: a node that is
    down makes each call raise :class:`KuboUnavailable`, not this.

    Args:
        api: the RPC API multiaddr (``/ip4``, ``/ip6``, ``/dns4``, ``/dns6`` + ``/tcp``).
        watch: where call outcomes go; a fresh :class:`KuboWatch` by default.
    Raises:
        ConfigError: ``api`` is not such a multiaddr, or aioipfs is not installed.
    """
    try:
        import aiohttp
        import aioipfs
        import trio_asyncio
    except ImportError as e:
        raise ConfigError(
            f"[ipfs] api is set but {e.name} is not installed (pip install aioipfs trio-asyncio)"
        ) from None

    class _Client(aioipfs.AsyncIPFS):  # type: ignore[misc,unused-ignore]
        """AsyncIPFS whose session gives up connecting after CONNECT_TIMEOUT_S."""

        def get_session(self, conn_timeout: float = 0, read_timeout: float = 0) -> Any:
            return aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                # 1 MiB reads: fewer, larger pieces cross the trio-asyncio bridge on cat.
                read_bufsize=CAT_BUFFER_BYTES,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=CONNECT_TIMEOUT_S,
                    sock_connect=CONNECT_TIMEOUT_S,
                    sock_read=READ_IDLE_TIMEOUT_S,
                ),
            )

    async def make_client() -> Any:
        return _Client(maddr=api)

    async def close_client(client: Any) -> None:
        await client.close()

    try:
        async with trio_asyncio.open_loop():
            client = await _make_client(api, make_client)
            try:
                yield KuboBackend(api, client, watch or KuboWatch(api))
            finally:
                with trio.CancelScope(shield=True):
                    await trio_asyncio.aio_as_trio(close_client)(client)
    except BaseExceptionGroup as group:
        # open_loop runs the body in a nursery; give callers the body's own exception.
        raise _sole(group) from None


async def _make_client(api: str, make_client: Callable[[], Awaitable[Any]]) -> Any:
    """Create the AsyncIPFS client inside the asyncio loop; a bad address is a ConfigError."""
    import aioipfs
    import trio_asyncio

    try:
        return await trio_asyncio.aio_as_trio(make_client)()
    except aioipfs.InvalidNodeAddressError as e:
        raise ConfigError(
            f"[ipfs] api = {api!r} is not an RPC API multiaddr like "
            f"'/ip4/127.0.0.1/tcp/5001' ({e})"
        ) from None

