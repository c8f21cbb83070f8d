"""Prometheus metrics for one node, read from the services' own attributes.

Every gauge and counter is computed at scrape time by a custom collector (nothing is
double-booked: the services already count). The one exception is the task latency
histogram, which needs one observation per finished task: :class:`NodeMetrics.sample`
looks for tasks that ended since its last pass (only when the task service's terminal
counters moved) and observes ``finished - submitted`` under the task's kind and route.
The API runs :meth:`NodeMetrics.run` beside the HTTP server, and every scrape samples
first, so a scrape never misses a task that ended before it.

Each node has its own registry (several nodes can run in one process in tests).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from teammesh.node.daemon import Node

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SAMPLE_EVERY_S = 1.0
TERMINAL = ("done", "failed", "cancelled")
STATES = ("queued", "running", "done", "failed", "cancelled")
# seconds from submission to the end; tasks range from sub-millisecond inline hashes
# to long NumPy jobs
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0, 300.0, 1800.0)


def route_of(record: Any, own_peer_id: str) -> str:
    """Where a finished task ran, as a small closed set of labels."""
    if getattr(record, "cached", False):
        return "cache"
    by = record.executed_by
    if not by:
        return "none"
    if by == "bridge":
        return "bridge"
    if by in ("local", own_peer_id):
        return "local"
    if "," in by:
        return "replicas"
    return "peer"


class NodeMetrics:
    """The registry of one node, plus the latency sampler."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = Histogram(
            "teammesh_task_latency_seconds",
            "Seconds from submission to the end of a task submitted here, by kind, route"
            " (local, peer, bridge, cache, replicas, none) and final state.",
            ["kind", "route", "state"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.registry.register(_NodeCollector(node))
        self._seen: set[str] = set()
        self._terminal_total = -1

    def sample(self) -> int:
        """Observe tasks that ended since the last pass; returns how many."""
        svc = self.node.tasks
        if svc is None:
            return 0
        total = sum(svc.counters.get(s, 0) for s in TERMINAL)
        if total == self._terminal_total:
            return 0
        first = self._terminal_total < 0
        self._terminal_total = total
        own = self.node.identity.peer_id
        seen = set()
        observed = 0
        for task_id, r in list(svc.records.items()):
            if r.state not in TERMINAL:
                continue
            seen.add(task_id)
            if task_id in self._seen or first:
                continue  # the first pass only learns what had ended before
            if r.finished is not None and r.submitted:
                self.latency.labels(r.kind, route_of(r, own), r.state).observe(
                    max(0.0, r.finished - r.submitted))
                observed += 1
        # forget ids the service forgot: the set stays as large as its memory
        self._seen = seen
        return observed

    def render(self) -> bytes:
        self.sample()
        return generate_latest(self.registry)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Sample every second so tasks that come and go between scrapes are counted."""
        self.sample()
        task_status.started()
        while True:
            await trio.sleep(SAMPLE_EVERY_S)
            self.sample()


class _NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        now = trio.current_time()
        live = node.mesh.table.live(now)
        host = node.host
        yield _gauge("teammesh_peers_live", "Members with a live capability ad.", len(live))
        yield _gauge("teammesh_peers_connected", "Peers with an open libp2p connection.",
                     len(host.connected_peers()) if host is not None else 0)
        yield _gauge("teammesh_slots", "Task slots this node offers.", node.capacity.slots)
        yield _gauge("teammesh_free_slots", "Task slots free now.", node.capacity.free_slots)
        peer_slots = GaugeMetricFamily("teammesh_team_slots",
                                       "Slots the live members advertise, by kind of count.",
                                       labels=["which"])
        peer_slots.add_metric(["total"], sum(e.ad.slots for e in live))
        peer_slots.add_metric(["free"], sum(e.ad.free_slots for e in live))
        yield peer_slots
        yield _counter("teammesh_ads_received", "Capability ads received.",
                       node.mesh.ads_received)
        yield _counter("teammesh_ads_rejected", "Capability ads rejected.",
                       node.mesh.ads_rejected)
        if host is not None:
            st = host.stats
            yield _counter("teammesh_refused_handshakes", "Connections refused after the"
                           " handshake (not a member).", st.refused_handshakes)
            yield _counter("teammesh_refused_streams", "Streams refused (not a member).",
                           st.refused_streams)
            yield _counter("teammesh_inbound_connections", "Inbound connections accepted.",
                           st.inbound_connections)
        yield from self._tasks(now)
        yield from self._files()
        yield _gauge("teammesh_uptime_seconds", "Seconds since the node started.",
                     round(time.time() - node.started_at, 1))

    def _tasks(self, now: float) -> Iterator[Metric]:
        svc = self.node.tasks
        if svc is None:
            return
        for name, value in svc.counters.items():
            yield _counter(f"teammesh_tasks_{name}", f"Tasks: {name.replace('_', ' ')}.", value)
        yield _gauge("teammesh_tasks_queued", "Tasks submitted here waiting to be placed.",
                     svc.queued_count)
        by_state = GaugeMetricFamily("teammesh_tasks", "Tasks this node holds in memory,"
                                     " by state.", labels=["state"])
        counts = dict.fromkeys(STATES, 0)
        for r in list(svc.records.values()):
            counts[r.state] = counts.get(r.state, 0) + 1
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state
        running = GaugeMetricFamily("teammesh_tasks_running_by_kind",
                                    "Tasks submitted here running now, by kind.",
                                    labels=["kind"])
        for kind, n in sorted(svc.running_by_kind.items()):
            running.add_metric([kind], n)
        yield running
        ex = svc.executor
        yield _counter("teammesh_executor_completed", "Tasks this node executed for the team.",
                       ex.completed)
        yield _counter("teammesh_executor_failed", "Tasks this node failed to execute.",
                       ex.failed)
        yield _gauge("teammesh_executor_jobs", "Jobs running or queued in this node's"
                     " executor.", len(ex.by_id))
        # 0 closed (calls go through), 1 open (calls refused until it cools down)
        breakers = GaugeMetricFamily("teammesh_breaker_open", "Circuit breaker per peer and"
                                     " for the bridge: 1 open, 0 closed.", labels=["target"])
        failures = GaugeMetricFamily("teammesh_breaker_failures", "Consecutive failures"
                                     " counted by each circuit breaker.", labels=["target"])
        for target, br in sorted(svc.breakers.items()):
            breakers.add_metric([target], 0 if br.allows(now) else 1)
            failures.add_metric([target], br.failures)
        yield breakers
        yield failures

    def _files(self) -> Iterator[Metric]:
        files = self.node.files
        if files is None:
            return
        stats = files.stats
        fetched = CounterMetricFamily("teammesh_files_fetched", "Files fetched, by source.",
                                      labels=["source"])
        for source in ("local", "peers", "ipfs", "r2"):
            fetched.add_metric([source], stats.get(f"fetched_{source}", 0))
        yield fetched
        yield _counter("teammesh_files_shared", "Files shared from this node.",
                       stats.get("shared", 0))
        yield _counter("teammesh_mirror_uploads", "Files uploaded to the R2 mirror.",
                       stats.get("mirrored", 0))
        yield _counter("teammesh_mirror_failures", "Failed R2 mirror uploads.",
                       stats.get("mirror_failures", 0))
        yield _gauge("teammesh_mirror_backlog", "Files waiting for upload to the R2 mirror.",
                     len(files.queue.pending()))
        mirror_up = GaugeMetricFamily("teammesh_mirror_up", "R2 mirror state: 1 for the"
                                      " current state.", labels=["state"])
        mirror_up.add_metric([files.mirror_state], 1)
        yield mirror_up
        store = files.store
        yield _gauge("teammesh_store_bytes", "Bytes held in the local block store.",
                     store.size_bytes)
        bitswap = files.bitswap
        if bitswap is not None:
            moved = CounterMetricFamily("teammesh_bitswap_bytes", "Block bytes moved over"
                                        " Bitswap, by direction.", labels=["direction"])
            moved.add_metric(["sent"], bitswap.stats.bytes_sent)
            moved.add_metric(["received"], bitswap.stats.bytes_received)
            yield moved
            blocks = CounterMetricFamily("teammesh_bitswap_blocks", "Blocks moved over"
                                         " Bitswap, by direction.", labels=["direction"])
            blocks.add_metric(["sent"], bitswap.stats.blocks_sent)
            blocks.add_metric(["received"], bitswap.stats.blocks_received)
            yield blocks


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
