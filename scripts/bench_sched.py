#!/usr/bin/env python3
"""`scripts/bench sched`: the pure scheduler at 100 and 1,000 simulated members.

For each team size it runs the deterministic simulation (protocols/scheduler_sim.py:
every submitter its own Scheduler, executors with slots and fair queues, ads with a
debounce, 2 ms links) and prints, as JSON lines on stdout and a table on stderr:

- decision cost per task: CPU time (time.process_time) spent inside Scheduler.handle,
  all events included (ads, replies, results, ticks), divided by the tasks run;
- makespan ratio: the simulated makespan over an omniscient placer's, which knows every
  task's arrival and duration in advance, has no latency and no ads, and greedily starts
  each task, in arrival order, on the slot that frees first.

Then a burst: one submitter takes 2,000 submissions at once (a batch call, or a frame of
futures) in a team of 100 members, through ``handle`` once per task and through
``handle_many`` once for the lot; the figure is CPU time per task for each, best of 3.
"""

from __future__ import annotations

import argparse
import heapq
import json
import platform
import random
import sys
import time
from dataclasses import dataclass

from teammesh.protocols.scheduler_model import SchedulerConfig, Task
from teammesh.protocols.scheduler_sim import MemberSpec, SimConfig, Simulation


@dataclass(frozen=True, slots=True)
class Load:
    submitter: str
    task: Task
    at: float
    duration: float


def make_team(n: int, n_sub: int, rng: random.Random) -> tuple[MemberSpec, ...]:
    return tuple(MemberSpec(f"m{i:04d}", slots=rng.choice((1, 2, 4)), queue_max=8,
                            submitter=i < n_sub) for i in range(n))


def make_load(team: tuple[MemberSpec, ...], per_slot: int, rng: random.Random) -> list[Load]:
    subs = [m.name for m in team if m.submitter]
    slots = sum(m.slots for m in team)
    out = []
    for i in range(slots * per_slot):
        who = subs[i % len(subs)]
        out.append(Load(who, Task(f"t{i}", "k", "1", priority=rng.choice((0, 0, 0, 1))),
                        rng.uniform(0, 1.0), rng.uniform(0.05, 2.0)))
    return out


def omniscient_makespan(team: tuple[MemberSpec, ...], load: list[Load]) -> float:
    free = [0.0] * sum(m.slots for m in team)
    heapq.heapify(free)
    end = 0.0
    for item in sorted(load, key=lambda x: (x.at, x.task.id)):
        start = max(item.at, heapq.heappop(free))
        finish = start + item.duration
        heapq.heappush(free, finish)
        end = max(end, finish)
    return end


def run(n: int, n_sub: int, per_slot: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    team = make_team(n, n_sub, rng)
    load = make_load(team, per_slot, rng)
    cfg = SimConfig(members=team, sched=SchedulerConfig(), check=False,
                    ad_period_s=2.0 + n / 100)
    sim = Simulation(cfg, random.Random(seed + 1), meter=time.process_time)
    for item in load:
        sim.submit(item.submitter, item.task, item.at, item.duration)
    wall0 = time.monotonic()
    report = sim.run(10_000)
    wall = time.monotonic() - wall0
    lost, twice = report.lost(), report.twice()
    if lost or twice:
        raise RuntimeError(f"{n} members: {len(lost)} tasks lost, {len(twice)} delivered twice")
    makespan = max(report.finish_time.values())
    best = omniscient_makespan(team, load)
    return {"members": n, "submitters": n_sub, "slots": sum(m.slots for m in team),
            "tasks": len(load), "handle_calls": report.handle_calls,
            "decision_us_per_task": 1e6 * report.decision_s / len(load),
            "decision_us_per_call": 1e6 * report.decision_s / max(1, report.handle_calls),
            "makespan_s": makespan, "omniscient_makespan_s": best,
            "makespan_ratio": makespan / best, "sim_wall_s": wall}


def burst(n_tasks: int = 2000, members: int = 100) -> dict[str, object]:
    from teammesh.protocols.scheduler import Scheduler
    from teammesh.protocols.scheduler_model import PeerAd, Submitted

    def fresh() -> Scheduler:
        s = Scheduler(SchedulerConfig())
        for i in range(members):
            s.handle(PeerAd(f"p{i}", {"k": "1"}, 2, 2, 0, 4096), 0.0)
        return s

    def events() -> list[Submitted]:
        return [Submitted(Task(f"t{i}", "k", "1")) for i in range(n_tasks)]

    def one_by_one() -> float:
        s, evs = fresh(), events()
        t0 = time.process_time()
        for ev in evs:
            s.handle(ev, 1.0)
        return time.process_time() - t0

    def at_once() -> float:
        s, evs = fresh(), events()
        t0 = time.process_time()
        s.handle_many(evs, 1.0)
        return time.process_time() - t0

    each = min(one_by_one() for _ in range(3))
    many = min(at_once() for _ in range(3))
    return {"figure": "sched_burst", "members": members, "tasks": n_tasks,
            "handle_us_per_task": 1e6 * each / n_tasks,
            "handle_many_us_per_task": 1e6 * many / n_tasks, "speedup": each / many}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000")
    p.add_argument("--submitters", type=int, default=8)
    p.add_argument("--per-slot", type=int, default=8, help="tasks per slot in the team")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="100 members only")
    args = p.parse_args(argv)
    sizes = [100] if args.quick else [int(x) for x in args.sizes.split(",")]
    machine = f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}"
    rows = []
    for n in sizes:
        row = run(n, min(args.submitters, n), args.per_slot, args.seed)
        row = {"figure": "sched", **row, "machine": machine.strip()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"{'members':>8} {'subs':>5} {'tasks':>7} {'µs/task':>9} {'µs/call':>8} "
          f"{'makespan':>9} {'omniscient':>10} {'ratio':>6}", file=sys.stderr)
    for r in rows:
        print(f"{r['members']:>8} {r['submitters']:>5} {r['tasks']:>7} "
              f"{r['decision_us_per_task']:>9.1f} {r['decision_us_per_call']:>8.1f} "
              f"{r['makespan_s']:>8.2f}s {r['omniscient_makespan_s']:>9.2f}s "
              f"{r['makespan_ratio']:>6.2f}", file=sys.stderr)
    b = {**burst(), "machine": machine.strip()}
    print(json.dumps(b), flush=True)
    print(f"burst of {b['tasks']} submissions, {b['members']} members: handle"
          f" {b['handle_us_per_task']:.1f} µs/task, handle_many"
          f" {b['handle_many_us_per_task']:.1f} µs/task ({b['speedup']:.1f}x)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
