"""The daemon: one root nursery that owns every service of a running node.

Start order: journal → membership → libp2p host (gated by membership) → membership
service → mesh (ads, dialer) → tasks → control API. ``api.json`` is written last, when
the node is ready, and removed on the way out, so the CLI never talks to a half-started
or stopped node.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from teammesh.node.core.audit import AuditLog
from teammesh.node.core.config import Config, Home
from teammesh.node.core.gpu import detect_gpus
from teammesh.node.core.journal import Journal
from teammesh.node.p2p.host import MeshHost, open_host
from teammesh.node.p2p.membership import Membership
from teammesh.node.p2p.mesh import Capacity, Mesh, is_loopback
from teammesh.protocols.errors import ConfigError

import teammesh

if TYPE_CHECKING:
    from teammesh.node.bridge.client import BridgeClient
    from teammesh.node.files.service import FilesService
    from teammesh.node.tasks.service import TaskService

logger = logging.getLogger("teammesh.daemon")


@dataclass(frozen=True, slots=True)
class UpOptions:
    listen: list[str]
    bootstrap: list[str]
    api: str
    slots: int | None = None
    pull: bool = False
    bridge: str | None = None


class Node:
    """Everything a running node holds; services get what they need from here."""

    def __init__(self, home: Home, config: Config, options: UpOptions) -> None:
        self.home = home
        self.config = config
        self.options = options
        home.tighten()  # homes from before 0600 was the rule hold the bridge key at 0644
        self.identity = home.identity()
        self.journal = Journal(home.journal_file)
        self.audit = AuditLog(home.path / "audit.log")
        self.membership = Membership(
            home, self.journal, self.identity,
            bitswap_peers=set(config.get("files", "allow_peers")),
            bitswap_public=config.get("files", "serve") == "public")
        self.membership.audit = self.audit
        self.membership.require_team()
        slots = options.slots if options.slots is not None else config.get("node", "slots")
        self.capacity = Capacity(slots=slots, cost=config.get("node", "cost"),
                                 pull=options.pull)
        from teammesh.node.kinds import load_kinds

        self.kinds = load_kinds(config.get("executor", "allow"))
        self.capacity.kinds = {k.name: k.version for k in self.kinds.values()}
        saved = self.journal.get("bootstrap")
        bootstrap = list(options.bootstrap) + list(config.get("node", "bootstrap"))
        if saved:
            bootstrap += [a for a in json.loads(saved) if a not in bootstrap]
        self.mesh = Mesh(self.identity, self.membership, self.capacity,
                         interval_s=config.get("gossip", "ad_interval_s"),
                         ttl_s=config.get("gossip", "ad_ttl_s"), bootstrap=bootstrap,
                         max_peers=config.get("node", "max_peers"), gpus=detect_gpus())
        self.host: MeshHost | None = None
        self.api_url = ""
        self.api_socket: str | None = None
        self.started_at = time.time()
        self.stop_requested = trio.Event()
        # Built by run_daemon once the node exists; None in a node started without them
        # (tests that exercise the mesh alone).
        self.tasks: TaskService | None = None
        self.files: FilesService | None = None
        self.bridge: BridgeClient | None = None  # when a bridge URL and key are known

    def set_slots(self, slots: int) -> None:
        """Change the slots offered to the team (advertised at once)."""
        if self.tasks is not None:
            self.tasks.executor.resize(slots)
        else:
            self.capacity.slots = slots
        self.capacity.notify()

    def status(self) -> dict[str, Any]:
        host = self.host
        assert host is not None
        stats = host.stats
        observed = [{"addr": a, "observers": len(obs)} for a, obs in stats.observed.items()]
        inbound = stats.inbound_connections > 0
        routable = [a for a in host.listen_addrs if not is_loopback(a)]
        if inbound:
            note = "peers have connected to this node inbound: it is reachable"
        elif not routable:
            note = ("listening on loopback only: peers on other machines cannot reach this "
                    "node (use --listen /ip4/0.0.0.0/tcp/4117)")
        else:
            note = ("no peer has connected inbound yet; if that persists, this node may be "
                    "behind NAT or a firewall (forward the port, or use --pull with a bridge)")
        return {
            "peer_id": self.identity.peer_id,
            "addrs": host.addrs,
            "api": self.api_url,
            "team": self.membership.summary(),
            "slots": self.capacity.slots,
            "free_slots": self.capacity.free_slots,
            "queue": self.capacity.queue,
            "kinds": sorted(self.capacity.kinds),
            "connected_peers": len(host.connected_peers()),
            "live_peers": len(self.mesh.table.live(trio.current_time())),
            "reachability": {
                "observed_addrs": observed,
                "inbound_connections": stats.inbound_connections,
                "inbound_peers": len(stats.inbound_peers),
                "reachable": inbound,
                "note": note,
            },
            "refused": {"handshakes": stats.refused_handshakes,
                        "streams": stats.refused_streams,
                        "penalised": stats.penalised,
                        "bad_gossip_streams": stats.bad_gossip_streams},
            "version": teammesh.__version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from teammesh.node.api.server import (
            serve_api,  # imported here so `teammesh status` never loads it
        )

        try:
            async with open_host(self.identity.seed, self.options.listen,
                                 peer_gate=self.membership.peer_gate,
                                 stream_gate=self.membership.stream_gate) as host:
                self.host = host
                async with contextlib.AsyncExitStack() as stack, \
                        trio.open_nursery() as nursery:
                    await nursery.start(self.audit.run)
                    await nursery.start(self.membership.run, host)
                    api = self.config.get("ipfs", "api")
                    if self.files is not None and api:
                        from teammesh.node.files.kubo import open_kubo

                        kubo = await stack.enter_async_context(open_kubo(api))
                        self.files.kubo = kubo
                        await nursery.start(kubo.watch.run, kubo)
                    if self.files is not None:
                        await nursery.start(self.files.run, host)
                    if self.tasks is not None:
                        await nursery.start(self.tasks.run, host)
                    await nursery.start(self.mesh.run, host)
                    if self.options.pull and self.bridge is not None and self.tasks and \
                            self.files is not None:
                        from teammesh.node.tasks.pull import PullWorker

                        await nursery.start(PullWorker(self.kinds, self.capacity, self.tasks,
                                                       self.files, self.bridge).run)
                    if self.tasks is not None:
                        from teammesh.node.api.ctlsock import serve_control_socket

                        self.api_socket = await nursery.start(serve_control_socket, self)
                    self.api_url = await nursery.start(serve_api, self, self.options.api)
                    self._write_api_file()
                    logger.info("node %s ready: %s; api %s", self.identity.peer_id,
                                " ".join(host.addrs), self.api_url)
                    # Everything allocated so far (py-libp2p's and our modules, the host)
                    # lives as long as the process: keep it out of the collector's full
                    # passes, which otherwise walk it again and again under load.
                    gc.collect()
                    gc.freeze()
                    task_status.started(self)
                    await self.stop_requested.wait()
                    # let the API answer the request that asked us to stop
                    await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
        finally:
            self.home.api_file.unlink(missing_ok=True)
            self.journal.close()

    def _write_api_file(self) -> None:
        assert self.host is not None
        data = {"url": self.api_url, "pid": os.getpid(), "peer_id": self.identity.peer_id,
                "addrs": self.host.addrs, "socket": self.api_socket}
        tmp = self.home.api_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.home.api_file)


async def run_daemon(home: Home, config: Config, options: UpOptions,
                     ready: Any = None) -> None:
    """Run until SIGINT/SIGTERM; a signal ends the node cleanly (exit status 0)."""
    from teammesh.node.files.service import FilesService
    from teammesh.node.tasks.service import TaskService

    node = Node(home, config, options)
    node.files = FilesService(config, home.path, is_member=node.membership.is_member,
                              admit_peer=node.membership.bitswap_peers.add)
    node.tasks = TaskService(
        config=config, home=home, identity=node.identity, journal=node.journal,
        audit=node.audit, membership=node.membership, mesh=node.mesh,
        capacity=node.capacity, kinds=node.kinds, files=node.files,
        stop_requested=node.stop_requested)
    key_hex = config.get("bridge", "key")
    key = bytes.fromhex(key_hex) if key_hex else node.membership.bridge_key
    if options.bridge:
        if key is None:
            raise ConfigError("a bridge URL is set but this node has no bridge key: set"
                              " [bridge] key (hex) or TEAMMESH_BRIDGE_KEY, or re-join the team")
        from teammesh.node.bridge.client import BridgeClient

        node.bridge = BridgeClient(options.bridge, key, node.identity.peer_id,
                                   proxy=config.get("bridge", "proxy") or None)
        node.tasks.bridge = node.bridge
        # membership swaps the client's key when the team's bridge key rotates
        node.membership.bridge = node.bridge
    elif options.pull:
        raise ConfigError("--pull needs a bridge: give --bridge URL or set [bridge] url")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            watch_scope = trio.CancelScope()

            async def watch() -> None:
                with watch_scope:
                    async for _ in signals:
                        logger.info("stopping")
                        node.stop_requested.set()
                        return

            nursery.start_soon(watch)
            await nursery.start(node.run)
            if ready is not None:
                ready(node)
            await node.stop_requested.wait()
            watch_scope.cancel()
