"""Who runs what, and where there is room: the scheduler's indexes over its peer views.

Theory of operation: every change to a view goes through ``touch``, which keeps the
per-kind sets (runners, members with a free slot, members whose slots all hold our own
tasks) and the lazy heaps in step. Heap entries carry the view's ``stamp``; a touched
view gets a new entry and its old ones become stale, dropped when they reach the top.
So finding the best free peer or the least loaded queue costs O(log members), not a scan.
Two counters tell the scheduler when a fresh look can pay: ``roster`` moves when who runs
what changes, ``free_epoch`` when a member gets a free slot.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable

from .scheduler_model import LOCAL, PeerAd, Task, Weights, Where
from .scheduler_peers import PeerView

Entry = tuple[float, str, int]  # (rank, peer, stamp): lower rank first, then peer id


class PeerIndex:
    def __init__(self, weights: Weights) -> None:
        self.weights = weights
        self.views: dict[str, PeerView] = {}
        self.runners: dict[str, set[str]] = {}  # kind -> peers (and LOCAL) running it
        self.free: dict[str, set[str]] = {}  # kind -> those with a free slot
        self.filled: set[str] = set()  # peers whose slots all hold our tasks
        self.roster = 0
        self.free_epoch = 0
        self._free_heaps: dict[tuple[str, str], list[Entry]] = {}
        self._queue_heaps: dict[str, list[Entry]] = {}
        self._free_keys: list[tuple[str, str]] = []  # (kind, version) of every free heap
        self._runner_cache: dict[Hashable, tuple[int, list[str], int, frozenset[str]]] = {}

    # --- changes -----------------------------------------------------------------------
    def upsert(self, ad: PeerAd) -> PeerView:
        """Take an ad (new peer or newer ad) and return the peer's view."""
        view = self.views.get(ad.peer)
        if view is None:
            view = PeerView.from_ad(ad)
            self.views[ad.peer] = view
            self.roster += 1
        else:
            before = (view.kinds, view.slots, view.memory_mb, view.gpus)
            self._unlist(view)
            view.update(ad)
            if before != (view.kinds, view.slots, view.memory_mb, view.gpus):
                self.roster += 1
        for kind in view.kinds:
            self.runners.setdefault(kind, set()).add(ad.peer)
        self.touch(view)
        return view

    def remove(self, peer: str) -> PeerView | None:
        view = self.views.pop(peer, None)
        if view is not None:
            self.roster += 1
            self.filled.discard(peer)
            self._unlist(view)
        return view

    def _unlist(self, view: PeerView) -> None:
        view.listed_free = None
        for kind in view.kinds:
            self.runners.get(kind, set()).discard(view.peer)
            self.free.get(kind, set()).discard(view.peer)

    def touch(self, view: PeerView) -> None:
        """A view's capacity, health or ad changed: bring every index up to date."""
        view.stamp += 1
        free = view.can_start()
        if view.peer != LOCAL:
            # only the kinds tasks were placed for have heaps: a member advertising twenty
            # kinds costs what its one busy kind costs
            kinds = view.kinds
            if free:
                for kind, version in self._free_keys:
                    if kind in kinds:
                        heapq.heappush(self._free_heaps[(kind, version)], (
                            -view.score_for(kind, version, self.weights), view.peer,
                            view.stamp))
            if view.has_queue_place:
                for kind, heap in self._queue_heaps.items():
                    if kind in kinds:
                        heapq.heappush(heap, (view.load, view.peer, view.stamp))
            if view.slots and len(view.inflight) >= view.slots:
                self.filled.add(view.peer)
            else:
                self.filled.discard(view.peer)
        if free is view.listed_free:
            return  # the free sets already say so (most touches change only load or health)
        view.listed_free = free
        for kind in view.kinds:
            s = self.free.setdefault(kind, set())
            if not free:
                s.discard(view.peer)
            elif view.peer not in s:
                s.add(view.peer)
                self.free_epoch += 1

    # --- queries -----------------------------------------------------------------------
    def runners_for(self, key: Hashable, t: Task) -> tuple[list[str], int, frozenset[str]]:
        """Members that run the kind with the resources ``t`` needs and may take it by its
        ``where`` (breakers aside), sorted, with their slots; cached per ``key`` (tasks
        with the same key get the same answer) until the roster changes."""
        cached = self._runner_cache.get(key)
        if cached is not None and cached[0] == self.roster:
            return cached[1], cached[2], cached[3]
        ok = sorted(p for p in self.runners.get(t.kind, ()) if self.views[p].runs(t))
        if t.where is Where.LOCAL:
            ok = [p for p in ok if p == LOCAL]
        elif t.where is Where.PEERS:
            ok = [p for p in ok if p != LOCAL]
        slots = sum(self.views[p].slots for p in ok)
        self._runner_cache[key] = (self.roster, ok, slots, frozenset(ok))
        return ok, slots, frozenset(ok)

    def best_free(self, kind: str, version: str,
                  fits: Callable[[PeerView], bool]) -> str | None:
        """The best-scoring peer (never LOCAL) with a free slot that ``fits``."""
        return self._pick(self._free_heap(kind, version), fits)

    def least_loaded(self, kind: str, fits: Callable[[PeerView], bool]) -> str | None:
        """The peer (never LOCAL) running ``kind`` with a queue place for us and the
        fewest queued per slot."""
        return self._pick(self._queue_heap(kind), fits)

    def _pick(self, heap: list[Entry], fits: Callable[[PeerView], bool]) -> str | None:
        passed: list[Entry] = []
        found = None
        while heap:
            entry = heap[0]
            view = self.views.get(entry[1])
            if view is None or view.stamp != entry[2]:
                heapq.heappop(heap)  # stale
                continue
            if fits(view):
                found = view.peer
                break
            passed.append(heapq.heappop(heap))
        for entry in passed:
            heapq.heappush(heap, entry)
        return found

    def _free_heap(self, kind: str, version: str) -> list[Entry]:
        heap = self._free_heaps.get((kind, version))
        if heap is None or len(heap) > 4 * len(self.views) + 64:  # built or compacted
            heap = [(-self.views[p].score_for(kind, version, self.weights), p,
                     self.views[p].stamp) for p in self.free.get(kind, ()) if p != LOCAL]
            heapq.heapify(heap)
            if (kind, version) not in self._free_heaps:
                self._free_keys.append((kind, version))
            self._free_heaps[(kind, version)] = heap
        return heap

    def _queue_heap(self, kind: str) -> list[Entry]:
        heap = self._queue_heaps.get(kind)
        if heap is None or len(heap) > 4 * len(self.views) + 64:
            heap = [(v.load, p, v.stamp) for p in self.runners.get(kind, ())
                    if p != LOCAL and (v := self.views[p]).has_queue_place]
            heapq.heapify(heap)
            self._queue_heaps[kind] = heap
        return heap
