"""DAG workflows from TOML, run through the control API.

    [steps.digest]
    kind = "hash.sha256"
    input = "data.txt"              # a file, relative to the workflow file

    [steps.encode]
    kind = "base64.encode"
    input_from = "digest"           # input = that step's output (str -> UTF-8, else JSON)

    [steps.stats]
    kind = "np.stats"
    params_from = { values = "sample.values" }   # param <- a field of a step's output
    after = ["encode"]              # ordering without data

Independent steps are submitted together and run in parallel; a step starts when every
step it depends on is done; a failed step fails the steps after it (they are skipped).
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teammesh.protocols.errors import TeammeshError

from teammesh.client import decode_output

STEP_KEYS = {"kind", "input", "input_from", "params", "params_from", "after", "where",
             "priority", "replicas", "quorum", "timeout_s", "no_cache"}


@dataclass
class Step:
    name: str
    kind: str
    input_file: Path | None = None
    input_from: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    params_from: dict[str, str] = field(default_factory=dict)
    after: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def deps(self) -> set[str]:
        d = set(self.after)
        if self.input_from:
            d.add(self.input_from)
        d.update(ref.split(".", 1)[0] for ref in self.params_from.values())
        return d


def load_workflow(path: Path) -> dict[str, Step]:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TeammeshError(f"{path}: not valid TOML ({exc})") from exc
    raw = data.get("steps")
    if not isinstance(raw, dict) or not raw:
        raise TeammeshError(f"{path}: needs at least one [steps.NAME] table")
    steps: dict[str, Step] = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            raise TeammeshError(f"{path}: step {name!r} needs kind = \"...\"")
        unknown = set(spec) - STEP_KEYS
        if unknown:
            raise TeammeshError(f"{path}: step {name!r} has unknown keys {sorted(unknown)}")
        steps[name] = Step(
            name=name, kind=spec["kind"],
            input_file=(path.parent / spec["input"]) if "input" in spec else None,
            input_from=spec.get("input_from"), params=dict(spec.get("params", {})),
            params_from=dict(spec.get("params_from", {})), after=list(spec.get("after", [])),
            options={k: spec[k] for k in ("where", "priority", "replicas", "quorum",
                                          "timeout_s", "no_cache") if k in spec})
    for s in steps.values():
        missing = s.deps - set(steps)
        if missing:
            raise TeammeshError(f"{path}: step {s.name!r} depends on unknown {sorted(missing)}")
    _check_acyclic(steps, path)
    return steps


def _check_acyclic(steps: dict[str, Step], path: Path) -> None:
    state: dict[str, int] = {}

    def visit(n: str, trail: list[str]) -> None:
        if state.get(n) == 1:
            raise TeammeshError(f"{path}: steps form a cycle: {' -> '.join([*trail, n])}")
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in sorted(steps[n].deps):
            visit(d, [*trail, n])
        state[n] = 2

    for n in steps:
        visit(n, [])


def _as_bytes(output: Any) -> bytes:
    output = decode_output(output)
    if isinstance(output, bytes):
        return output
    if isinstance(output, str):
        return output.encode()
    return json.dumps(output).encode()


def _lookup(outputs: dict[str, Any], ref: str) -> Any:
    step, _, path = ref.partition(".")
    value = outputs[step]
    for part in path.split(".") if path else []:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise TeammeshError(f"step output {step!r} has no field {path!r}")
    return value


def run_workflow(client: Any, steps: dict[str, Step], *, quiet: bool = False) -> dict[str, Any]:
    outputs: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    running: dict[str, str] = {}  # step -> task id
    t0 = time.monotonic()
    while len(results) < len(steps):
        for s in steps.values():
            if s.name in results or s.name in running:
                continue
            if any(d in results and results[d]["state"] != "done" for d in s.deps):
                results[s.name] = {"state": "skipped", "executed_by": None, "output": None,
                                   "error": "an earlier step failed", "id": None}
                continue
            if not all(d in outputs for d in s.deps):
                continue
            data = None
            if s.input_file is not None:
                data = s.input_file.read_bytes()
            elif s.input_from:
                data = _as_bytes(outputs[s.input_from])
            params = dict(s.params)
            for name, ref in s.params_from.items():
                params[name] = _lookup(outputs, ref)
            task = client.submit(s.kind, data, params, **s.options)
            running[s.name] = task["id"]
        if not running:
            if len(results) < len(steps):
                raise TeammeshError("workflow is stuck: no step can start")
            break
        # wait for any running step; the API's long-poll keeps this cheap
        finished = False
        while not finished:
            for name, task_id in list(running.items()):
                t = client.task(task_id, wait=0.2)
                if t["state"] in ("done", "failed", "cancelled"):
                    del running[name]
                    results[name] = t
                    if t["state"] == "done":
                        outputs[name] = t["output"]
                    finished = True
    ok = all(r["state"] == "done" for r in results.values())
    return {"state": "done" if ok else "failed", "elapsed_s": round(time.monotonic() - t0, 3),
            "steps": {n: {"id": r["id"], "state": r["state"], "executed_by": r["executed_by"],
                          "output": r["output"], "error": r["error"]}
                      for n, r in results.items()}}
