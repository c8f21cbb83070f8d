"""The `teammesh` command: arguments in, one call out. No logic lives here.

Errors print one line (``error: ...``) on stderr and exit 1; usage errors exit 2.
Every command takes ``--json`` for scripts. The CLI never imports libp2p except for the
commands that run a host (``up``, ``join``, ``demo``), so it starts fast.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from teammesh.protocols.errors import TeammeshError

F = TypeVar("F", bound=Callable[..., Any])


class Ctx:
    def __init__(self, home: Path | None, as_json: bool, verbose: int,
                 log_format: str = "text") -> None:
        from teammesh.node.core.config import Home, default_home

        self.home = Home(home if home is not None else default_home())
        self.as_json = as_json
        self.verbose = verbose
        self.log_format = log_format

    def client(self) -> Any:
        from teammesh.client import Client

        return Client.from_home(self.home.path)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)


def emit(ctx: Ctx, as_json: bool, data: Any, human: Callable[[], None]) -> None:
    if as_json or ctx.as_json:
        click.echo(json.dumps(data, indent=None if isinstance(data, list) else 2, default=str))
    else:
        human()


def console() -> Any:
    from rich.console import Console

    return Console()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(path_type=Path), envvar="TEAMMESH_HOME",
              help="Node home directory (default: platform data dir; env TEAMMESH_HOME).")
@click.option("--json", "as_json", is_flag=True, help="JSON output for every command.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              envvar="TEAMMESH_LOG_FORMAT", show_default=True,
              help="json: one object per line with peer and task ids (for log collectors).")
@click.version_option(package_name="teammesh")
@click.pass_context
def cli(click_ctx: click.Context, home: Path | None, as_json: bool, verbose: int,
        log_format: str) -> None:
    """teammesh: share cores, tasks and files across your team's machines."""
    click_ctx.obj = Ctx(home, as_json, verbose, log_format)


pass_ctx = click.make_pass_decorator(Ctx)


@cli.command()
@json_option
@pass_ctx
def init(ctx: Ctx, as_json: bool) -> None:
    """Create this node's identity and config (safe to run again)."""
    identity, created = ctx.home.init()
    data = {"home": str(ctx.home.path), "peer_id": identity.peer_id, "created": created,
            "config": str(ctx.home.config_file)}
    emit(ctx, as_json, data, lambda: click.echo(
        f"{'initialised' if created else 'already initialised'} {ctx.home.path}\n"
        f"peer id: {identity.peer_id}\nconfig:  {ctx.home.config_file}"))


@cli.group()
def team() -> None:
    """Create a team, invite and revoke members."""


@team.command("create")
@click.argument("name")
@json_option
@pass_ctx
def team_create(ctx: Ctx, name: str, as_json: bool) -> None:
    """Make this node the root admin of a new team NAME."""
    from teammesh.node.core.journal import Journal
    from teammesh.node.p2p.membership import Membership

    identity = ctx.home.identity()
    if ctx.home.api_file.exists():
        raise TeammeshError("stop the running node first (`teammesh down`), then create the team")
    journal = Journal(ctx.home.journal_file)
    try:
        info = Membership(ctx.home, journal, identity).create_team(name)
    finally:
        journal.close()
    emit(ctx, as_json, {"team": info.team_id, "name": info.name, "admin": identity.peer_id},
         lambda: click.echo(f"created team {info.name!r} ({info.team_id}); this node is its"
                            " admin.\nnext: `teammesh up`, then `teammesh team invite`"))


@team.command("invite")
@click.option("--ttl", default="1h", show_default=True,
              help="How long the invite stays valid (e.g. 30m, 1h, 2d).")
@json_option
@pass_ctx
def team_invite(ctx: Ctx, ttl: str, as_json: bool) -> None:
    """Print a one-time invite for a new member (the node must be running)."""
    seconds = parse_duration(ttl)
    with ctx.client() as c:
        data = c.request("POST", "/v1/team/invite", json={"ttl_s": seconds})
    emit(ctx, as_json, data, lambda: click.echo(data["invite"]))


@team.command("revoke")
@click.argument("peer_id")
@json_option
@pass_ctx
def team_revoke(ctx: Ctx, peer_id: str, as_json: bool) -> None:
    """Remove PEER_ID from the team; the revocation spreads by gossip."""
    with ctx.client() as c:
        data = c.request("POST", "/v1/team/revoke", json={"peer_id": peer_id})
    emit(ctx, as_json, data, lambda: click.echo(f"revoked {peer_id}"))


@team.command("bridge-key")
@json_option
@pass_ctx
def team_bridge_key(ctx: Ctx, as_json: bool) -> None:
    """Print the team's master bridge key (hex; admins only), for the Worker's BRIDGE_KEY."""
    from teammesh.node.core.journal import Journal
    from teammesh.node.p2p.membership import Membership

    journal = Journal(ctx.home.journal_file)
    try:
        m = Membership(ctx.home, journal, ctx.home.identity())
        m.require_team()
        master, epoch = m.bridge_master, m.bridge_epoch
    finally:
        journal.close()
    if master is None:
        raise TeammeshError("only a team admin holds the master bridge key; this node has"
                            " only its own key derived from it (ask an admin)")
    emit(ctx, as_json, {"master": master.hex(), "epoch": epoch},
         lambda: click.echo(master.hex()))


@team.command("members")
@json_option
@pass_ctx
def team_members(ctx: Ctx, as_json: bool) -> None:
    """List the team's members as this node knows them."""
    with ctx.client() as c:
        data = c.request("GET", "/v1/team")

    def human() -> None:
        from rich.table import Table

        t = Table("peer id", "roles", "state")
        for m in data["members"]:
            t.add_row(m["peer_id"], ",".join(m["roles"]), "revoked" if m["revoked"] else "ok")
        console().print(t)

    emit(ctx, as_json, data, human)


@cli.command()
@click.argument("invite")
@click.option("--up", "then_up", is_flag=True,
              help="Then run the node in the foreground (as `teammesh up`).")
@click.option("--service", type=click.Choice(["user", "system"]), default=None,
              help="Then install and start a systemd unit (user or system) running the node.")
@json_option
@pass_ctx
def join(ctx: Ctx, invite: str, as_json: bool, then_up: bool, service: str | None) -> None:
    """Join a team with an INVITE from `teammesh team invite`."""
    import trio
    from teammesh.node.core.journal import Journal
    from teammesh.node.p2p.membership import join as do_join

    if not ctx.home.initialized:
        ctx.home.init()  # an invite is all a new member needs: no separate `init`
    identity = ctx.home.identity()
    journal = Journal(ctx.home.journal_file)
    quiet = as_json or ctx.as_json
    try:
        info = trio.run(do_join, ctx.home, journal, identity, invite,
                        (lambda s: None) if quiet else (lambda s: click.echo(s, err=True)))
    finally:
        journal.close()
    data: dict[str, Any] = {"team": info.team_id, "name": info.name,
                            "peer_id": identity.peer_id}
    if service:
        from teammesh.node.cli.doctor import install_node_service

        try:
            data["service"] = install_node_service(ctx.home.path, service)
        except TeammeshError as exc:
            raise TeammeshError(f"joined team {info.name!r}, but the service did not start:"
                                f" {exc}") from exc
        emit(ctx, as_json, data, lambda: click.echo(
            f"joined team {info.name!r} ({info.team_id}); the node runs as the {service}"
            f" service {data['service']['unit']}"))
        return
    if then_up:
        click.echo(f"joined team {info.name!r} ({info.team_id}); starting the node", err=True)
        click.get_current_context().invoke(up, listen=(), bootstrap=(), api=None, slots=None,
                                           pull=False, bridge=None)
        return
    emit(ctx, as_json, data,
         lambda: click.echo(f"joined team {info.name!r} ({info.team_id}); start with"
                            " `teammesh up`"))


@cli.command()
@click.option("--listen", multiple=True, help="Multiaddr to listen on (repeatable).")
@click.option("--bootstrap", multiple=True, help="Full multiaddr of a member to dial.")
@click.option("--api", default=None, help="Control API HOST:PORT on loopback (0 = free port).")
@click.option("--slots", type=click.IntRange(0, 1024), default=None,
              help="Task slots this node offers (default: config, else cores).")
@click.option("--pull", is_flag=True, help="No inbound connections: take work from the bridge.")
@click.option("--bridge", default=None, help="URL of the team's Cloudflare bridge.")
@pass_ctx
def up(ctx: Ctx, listen: tuple[str, ...], bootstrap: tuple[str, ...], api: str | None,
       slots: int | None, pull: bool, bridge: str | None) -> None:
    """Run the node in the foreground until Ctrl-C / SIGTERM."""
    import trio
    from teammesh.node.core.config import load_config
    from teammesh.node.daemon import UpOptions, run_daemon

    ctx.home.require()
    setup_logging(ctx.verbose, ctx.log_format)
    config = load_config(ctx.home)
    if ctx.home.api_file.exists():
        try:
            with ctx.client() as c:
                c.status()
            raise TeammeshError(f"a node is already running in {ctx.home.path}")
        except TeammeshError as exc:
            if "already running" in str(exc):
                raise
            ctx.home.api_file.unlink(missing_ok=True)  # left by a killed daemon
    options = UpOptions(
        listen=list(listen) or ([] if pull else list(config.get("node", "listen"))),
        bootstrap=list(bootstrap), api=api or config.get("node", "api"), slots=slots,
        pull=pull, bridge=bridge or config.get("bridge", "url") or None)

    def ready(node: Any) -> None:
        click.echo(f"teammesh node {node.identity.peer_id} up", err=True)
        for a in node.host.addrs:
            click.echo(f"  listening {a}", err=True)
        click.echo(f"  api {node.api_url}", err=True)

    trio.run(run_daemon, ctx.home, config, options, ready)


@cli.command()
@json_option
@pass_ctx
def down(ctx: Ctx, as_json: bool) -> None:
    """Stop the running node."""
    with ctx.client() as c:
        data = c.request("POST", "/v1/stop")
    emit(ctx, as_json, data, lambda: click.echo("stopping"))


@cli.command()
@click.option("--verify", is_flag=True, help="Check the hash chain; exit 1 if it is broken.")
@click.option("--tail", "tail", type=click.IntRange(0), default=20, show_default=True,
              help="How many of the last records to show.")
@json_option
@pass_ctx
def audit(ctx: Ctx, verify: bool, tail: int, as_json: bool) -> None:
    """Show (or --verify) the audit log: membership changes, who ran what for whom."""
    from teammesh.node.core.audit import verify as verify_chain

    path = ctx.home.path / "audit.log"
    if not path.exists():
        raise TeammeshError(f"no audit log at {path} yet (the node writes it while it runs)")
    if verify:
        result = verify_chain(path)
        emit(ctx, as_json, result, lambda: click.echo(
            f"audit log intact: {result['lines']} records" if result["ok"]
            else f"audit log BROKEN: {result['reason']}"))
        if not result["ok"]:
            sys.exit(1)
        return
    lines = path.read_text(errors="replace").splitlines()[-tail:] if tail else []
    records = []
    for raw in lines:
        try:
            records.append(json.loads(raw))
        except ValueError:
            continue

    def human() -> None:
        for r in records:
            rest = {k: v for k, v in r.items() if k not in ("seq", "ts", "event", "prev", "hash")}
            click.echo(f"{r.get('seq')}\t{r.get('ts')}\t{r.get('event')}\t"
                       + " ".join(f"{k}={v}" for k, v in rest.items()))

    emit(ctx, as_json, records, human)


@cli.command()
@json_option
@pass_ctx
def status(ctx: Ctx, as_json: bool) -> None:
    """Show this node: peer id, addresses, team, slots, reachability."""
    with ctx.client() as c:
        data = c.status()

    def human() -> None:
        from rich.table import Table

        t = Table(show_header=False, box=None)
        t.add_row("peer id", data["peer_id"])
        for a in data["addrs"]:
            t.add_row("address", a)
        t.add_row("api", data["api"])
        team_info = data.get("team") or {}
        t.add_row("team", f"{team_info.get('name')} ({team_info.get('id')})")
        t.add_row("slots", f"{data['free_slots']} free of {data['slots']}")
        t.add_row("peers", f"{data['live_peers']} live, {data['connected_peers']} connected")
        r = data["reachability"]
        t.add_row("reachable", "yes" if r["reachable"] else "not yet")
        t.add_row("", r["note"])
        console().print(t)

    emit(ctx, as_json, data, human)


@cli.command()
@json_option
@pass_ctx
def peers(ctx: Ctx, as_json: bool) -> None:
    """List live team members and what they offer."""
    with ctx.client() as c:
        data = c.peers()

    def human() -> None:
        from rich.table import Table

        t = Table("peer id", "free/slots", "queue", "kinds", "addrs")
        for p in data:
            t.add_row(p["peer_id"], f"{p['free_slots']}/{p['slots']}", str(p["queue"]),
                      str(len(p["kinds"])), "\n".join(p["addrs"][:2]))
        console().print(t if data else "no live peers yet")

    emit(ctx, as_json, data, human)


@cli.command()
@click.option("--nodes", default=3, type=click.IntRange(2, 10), show_default=True)
@click.option("--keep", is_flag=True, help="Keep the mesh running until Ctrl-C.")
@json_option
@pass_ctx
def demo(ctx: Ctx, nodes: int, keep: bool, as_json: bool) -> None:
    """Start a local mesh of real daemons on 127.0.0.1 and show it working."""
    from teammesh.node.cli.demo import run_demo

    result = run_demo(nodes, keep=keep, quiet=as_json or ctx.as_json)
    emit(ctx, as_json, result, lambda: None)


def _read_input(spec: str | None) -> bytes | None:
    if spec is None:
        return None
    if spec == "-":
        return sys.stdin.buffer.read()
    path = Path(spec)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise TeammeshError(f"input file {spec} does not exist") from exc
    except IsADirectoryError as exc:
        raise TeammeshError(f"input {spec} is a directory, not a file") from exc


def _parse_params(pairs: tuple[str, ...], params_json: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if params_json:
        try:
            loaded = json.loads(params_json)
        except ValueError as exc:
            raise TeammeshError(f"--params is not JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise TeammeshError("--params must be a JSON object")
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TeammeshError(f"--param {pair!r} must look like key=value")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def _print_task(task: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(show_header=False, box=None)
    for key in ("id", "kind", "state", "executed_by", "waiting_reason", "error"):
        if task.get(key) is not None:
            t.add_row(key, str(task[key]))
    if task.get("attempts"):
        t.add_row("attempts", "\n".join(
            f"{a['peer']}: {a.get('error') or 'ok'}" for a in task["attempts"]))
    if task.get("state") == "done":
        t.add_row("output", json.dumps(task["output"])[:2000])
    console().print(t)


def _write_output(task: dict[str, Any], path: str) -> None:
    from teammesh.client import decode_output

    out = decode_output(task.get("output"))
    if isinstance(out, bytes):
        data = out
    elif isinstance(out, str):
        data = out.encode()
    else:
        data = json.dumps(out).encode()
    tmp = Path(path + ".partial")
    tmp.write_bytes(data)
    tmp.replace(path)


def _finish(task: dict[str, Any]) -> None:
    if task.get("state") == "failed":
        raise TeammeshError(f"task {task['id']} failed: {task.get('error')}")
    if task.get("state") == "cancelled":
        raise TeammeshError(f"task {task['id']} was cancelled")


@cli.command()
@click.argument("kind")
@click.option("--input", "input_spec", help="Input file, or - for stdin.")
@click.option("--input-cid", "input_cid", default=None,
              help="Input by CID: a file shared with `teammesh share` (fetched by the executor).")
@click.option("--param", "params", multiple=True, help="key=value (value parsed as JSON).")
@click.option("--params", "params_json", help="All params as a JSON object.")
@click.option("--where", type=click.Choice(["any", "local", "peers", "bridge"]), default="any",
              show_default=True)
@click.option("--replicas", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Run it on N distinct members and compare their outputs.")
@click.option("--quorum", type=click.IntRange(1, 16), default=None,
              help="Done when K replicas agree (1 to --replicas; default: all of them).")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--timeout", type=float, default=None, help="Deadline in seconds.")
@click.option("--no-cache", is_flag=True, help="Run even if a cached result exists.")
@click.option("--wait", is_flag=True, help="Wait for the result.")
@click.option("-o", "--output", "output_path", help="With --wait: write the output to a file.")
@json_option
@pass_ctx
def submit(ctx: Ctx, kind: str, input_spec: str | None, input_cid: str | None,
           params: tuple[str, ...],
           params_json: str | None, where: str, replicas: int, quorum: int | None,
           priority: int, timeout: float | None, no_cache: bool, wait: bool,
           output_path: str | None, as_json: bool) -> None:
    """Submit a task of KIND; prints its id, or its result with --wait."""
    if quorum is not None and quorum > replicas:
        raise click.BadParameter(f"{quorum} is more than --replicas {replicas}: at most as many"
                                 " replicas as run can agree (raise --replicas)",
                                 param_hint="--quorum")
    data = _read_input(input_spec)
    with ctx.client() as c:
        c._http.timeout = httpx_timeout(None if wait else 30)
        task = c.submit(kind, data, _parse_params(params, params_json), where=where,
                        replicas=replicas, quorum=quorum, priority=priority, timeout_s=timeout,
                        no_cache=no_cache or None, wait=True if wait else None,
                        input_cid=input_cid)
        if wait and task["state"] not in ("done", "failed", "cancelled"):
            while task["state"] not in ("done", "failed", "cancelled"):
                task = c.task(task["id"], wait=60)
    if wait and output_path and task["state"] == "done":
        _write_output(task, output_path)
    if as_json or ctx.as_json:
        click.echo(json.dumps(task, indent=2))
    elif wait:
        _print_task(task)
    else:
        click.echo(task["id"])
    if wait:
        _finish(task)


def httpx_timeout(read: float | None) -> Any:
    import httpx

    return httpx.Timeout(30, read=read)


@cli.group()
def task() -> None:
    """Show, wait for, cancel and list tasks."""


@task.command("show")
@click.argument("task_id")
@json_option
@pass_ctx
def task_show(ctx: Ctx, task_id: str, as_json: bool) -> None:
    """Show one task."""
    with ctx.client() as c:
        data = c.task(task_id)
    emit(ctx, as_json, data, lambda: _print_task(data))


@task.command("wait")
@click.argument("task_id")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@json_option
@pass_ctx
def task_wait(ctx: Ctx, task_id: str, timeout: float | None, as_json: bool) -> None:
    """Wait until a task ends; exit 1 if it failed."""
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    with ctx.client() as c:
        data = c.task(task_id)
        while data["state"] not in ("done", "failed", "cancelled"):
            left = 60.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TeammeshError(f"task {task_id} still {data['state']} after {timeout} s"
                                    f" ({data.get('waiting_reason') or 'running'})")
            data = c.task(task_id, wait=min(60.0, left))
    emit(ctx, as_json, data, lambda: _print_task(data))
    _finish(data)


@task.command("cancel")
@click.argument("task_id")
@json_option
@pass_ctx
def task_cancel(ctx: Ctx, task_id: str, as_json: bool) -> None:
    """Cancel a task that has not finished."""
    with ctx.client() as c:
        data = c.cancel(task_id)
    emit(ctx, as_json, data, lambda: click.echo(f"{task_id}: {data['state']}"))


@task.command("list")
@click.option("--state", type=click.Choice(["queued", "running", "done", "failed",
                                            "cancelled"]), default=None)
@click.option("--limit", type=int, default=100, show_default=True)
@json_option
@pass_ctx
def task_list(ctx: Ctx, state: str | None, limit: int, as_json: bool) -> None:
    """List this node's tasks, newest first."""
    with ctx.client() as c:
        data = c.tasks(state=state, limit=limit) if state else c.tasks(limit=limit)

    def human() -> None:
        from rich.table import Table

        t = Table("id", "kind", "state", "executed by", "note")
        for d in data:
            t.add_row(d["id"], d["kind"], d["state"], (d["executed_by"] or "")[-12:],
                      d.get("error") or d.get("waiting_reason") or "")
        console().print(t)

    emit(ctx, as_json, data, human)


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--parallel", type=click.IntRange(1, 100_000), default=10_000, show_default=True,
              help="Tasks in flight at once.")
@json_option
@pass_ctx
def batch(ctx: Ctx, file: Path, parallel: int, as_json: bool) -> None:
    """Run every task in FILE.jsonl ({"kind", "input", "params", "tag"} per line; optional
    "where", "priority", "replicas", "quorum", "timeout_s", "no_cache")."""
    import base64

    from rich.progress import Progress

    bodies: list[dict[str, Any]] = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            spec = json.loads(line)
        except ValueError as exc:
            raise TeammeshError(f"{file}:{n}: not JSON ({exc})") from exc
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            raise TeammeshError(f"{file}:{n}: each line needs a \"kind\"")
        body: dict[str, Any] = {"kind": spec["kind"], "params": spec.get("params") or {},
                                "tag": spec.get("tag")}
        if spec.get("input") is not None:
            path = Path(spec["input"])
            if not path.is_absolute():
                path = file.parent / path
            data = _read_input(str(path))
            assert data is not None
            body["input_b64"] = base64.b64encode(data).decode()
        for key in ("where", "priority", "replicas", "quorum", "timeout_s", "no_cache"):
            if key in spec:
                body[key] = spec[key]
        bodies.append(body)
    quiet = as_json or ctx.as_json
    failed = 0
    results: list[dict[str, Any]] = []
    with ctx.client() as c, Progress(console=_stderr_console(), transient=quiet) as progress:
        bar = progress.add_task(f"{file.name}", total=len(bodies))
        for start in range(0, len(bodies), parallel):
            for r in c.stream_batch(bodies[start:start + parallel]):
                progress.advance(bar)
                failed += r["state"] != "done"
                row = {"tag": r["tag"], "id": r["id"], "kind": r["kind"], "state": r["state"],
                        "executed_by": r["executed_by"], "output": r["output"],
                        "error": r["error"]}
                if quiet:
                    click.echo(json.dumps(row))
                else:
                    results.append(row)
    if not quiet:
        done = len(bodies) - failed
        click.echo(f"{done} done, {failed} failed of {len(bodies)}")
    if failed:
        sys.exit(1)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@cli.group()
def workflow() -> None:
    """Run DAG workflows described in TOML."""


@workflow.command("run")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@pass_ctx
def workflow_run(ctx: Ctx, file: Path, as_json: bool) -> None:
    """Run FILE.toml: independent steps in parallel, dependent steps in order."""
    from teammesh.node.cli.workflow import load_workflow, run_workflow

    wf = load_workflow(file)
    with ctx.client() as c:
        result = run_workflow(c, wf, quiet=as_json or ctx.as_json)

    def human() -> None:
        from rich.table import Table

        t = Table("step", "state", "executed by", "output")
        for name, r in result["steps"].items():
            t.add_row(name, r["state"], (r["executed_by"] or "")[-12:],
                      json.dumps(r["output"])[:80] if r["state"] == "done" else r["error"] or "")
        console().print(t)

    emit(ctx, as_json, result, human)
    if result["state"] != "done":
        sys.exit(1)


@cli.command()
@json_option
@pass_ctx
def kinds(ctx: Ctx, as_json: bool) -> None:
    """Task kinds this node runs and the team offers."""
    with ctx.client() as c:
        data = c.kinds()

    def human() -> None:
        from rich.table import Table

        t = Table("kind", "version", "here", "peers", "description")
        for k in data:
            t.add_row(k["name"], k["version"], "yes" if k["local"] else "", str(k["peers"]),
                      k["description"][:60])
        console().print(t)

    emit(ctx, as_json, data, human)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mirror", is_flag=True, help="Also upload to the team's R2 mirror.")
@json_option
@pass_ctx
def share(ctx: Ctx, file: Path, mirror: bool, as_json: bool) -> None:
    """Add FILE to this node's store and print its CID (Kubo-identical)."""
    if not file.is_file():
        raise TeammeshError(f"{file} does not exist or is not a file")
    with ctx.client() as c:
        c._http.timeout = httpx_timeout(None)
        data = c.request("POST", "/v1/files/share",
                         json={"path": str(file.resolve()), "mirror": mirror})
    emit(ctx, as_json, data, lambda: click.echo(data["cid"]))


@cli.command()
@click.argument("cid")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), default=None,
              help="Where to write the file (default: ./CID).")
@click.option("--from", "providers", multiple=True, metavar="MULTIADDR",
              help="Fetch from this IPFS peer outside the team (Helia, Kubo...): its"
                   " multiaddr ending in /p2p/<peer id>. Repeatable. Only the peers named"
                   " are dialed; runs in this process, no node needed.")
@json_option
@pass_ctx
def get(ctx: Ctx, cid: str, output: Path | None, providers: tuple[str, ...],
        as_json: bool) -> None:
    """Fetch CID to a file: through this node (local store, team peers, files.providers,
    external IPFS, R2 mirror), or with --from straight from outside IPFS peers."""
    dest = (output or Path(cid)).resolve()
    quiet = as_json or ctx.as_json
    if providers:
        result = _get_from_providers(cid, dest, list(providers), quiet, ctx)
    else:
        try:
            client = ctx.client()
        except TeammeshError as exc:
            # no node running: the configured providers can still be asked directly
            from teammesh.node.core.config import load_config

            configured = list(load_config(ctx.home).get("files", "providers"))
            if not configured:
                raise TeammeshError(f"{exc}; or fetch straight from an IPFS peer outside"
                                    " the team: teammesh get CID --from /ip4/.../tcp/.../p2p/"
                                    "<peer id> (or list it in files.providers)") from None
            result = _get_from_providers(cid, dest, configured, quiet, ctx)
        else:
            result = _get_through_node(client, cid, dest, quiet)
    emit(ctx, as_json, result, lambda: click.echo(
        f"{result['path']} ({result['size']} bytes, from {result['source']})"))


def _progress(quiet: bool) -> Any:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    return Progress(BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=_stderr_console(), transient=True, disable=quiet)


def _get_through_node(client: Any, cid: str, dest: Path, quiet: bool) -> dict[str, Any]:
    result: dict[str, Any] | None = None
    with client as c, _progress(quiet) as progress:
        bar = progress.add_task("fetch", total=None)
        for line in c.stream_lines("POST", "/v1/files/get",
                                   json={"cid": cid, "dest": str(dest)}):
            if "progress" in line:
                progress.update(bar, completed=line["progress"], total=line["total"] or None)
            elif "error" in line:
                raise TeammeshError(line["error"])
            elif "done" in line:
                result = line["done"]
    if result is None:
        raise TeammeshError("the node ended the transfer without a result")
    return result


def _get_from_providers(cid: str, dest: Path, providers: list[str], quiet: bool,
                        ctx: Ctx) -> dict[str, Any]:
    import trio
    from teammesh.node.core.config import load_config
    from teammesh.node.files.service import fetch_from_providers

    config = load_config(ctx.home)
    with _progress(quiet) as progress:
        bar = progress.add_task("fetch", total=None)

        def tick(done: int, total: int) -> None:  # from the exporter thread
            progress.update(bar, completed=done, total=total or None)

        result: dict[str, Any] = trio.run(fetch_from_providers, config, cid, dest,
                                          providers, tick)
    return result


@cli.group()
def files() -> None:
    """List, pin, unpin and garbage-collect this node's files."""


@files.command("list")
@json_option
@pass_ctx
def files_list(ctx: Ctx, as_json: bool) -> None:
    """Pinned files and store usage."""
    with ctx.client() as c:
        data = c.request("GET", "/v1/files")

    def human() -> None:
        from rich.table import Table

        t = Table("cid", "size")
        for f in data["files"]:
            t.add_row(f["cid"], str(f["size"]))
        console().print(t)
        st = data["store"]
        console().print(f"store: {st['used_bytes']} bytes used of"
                        f" {st['limit_bytes'] or 'unlimited'}; mirror: {st['mirror']}"
                        f" ({st['mirror_pending']} pending)")

    emit(ctx, as_json, data, human)


def _files_call(ctx: Ctx, path: str, body: dict[str, Any], as_json: bool, text: str) -> None:
    with ctx.client() as c:
        c._http.timeout = httpx_timeout(None)
        data = c.request("POST", path, json=body)
    emit(ctx, as_json, data, lambda: click.echo(text.format(**data)))


@files.command("pin")
@click.argument("cid")
@json_option
@pass_ctx
def files_pin(ctx: Ctx, cid: str, as_json: bool) -> None:
    """Keep CID in the store (fetching it from peers if needed)."""
    _files_call(ctx, "/v1/files/pin", {"cid": cid}, as_json, "pinned {cid}")


@files.command("unpin")
@click.argument("cid")
@json_option
@pass_ctx
def files_unpin(ctx: Ctx, cid: str, as_json: bool) -> None:
    """Let gc remove CID."""
    _files_call(ctx, "/v1/files/unpin", {"cid": cid}, as_json, "unpinned {cid}")


@files.command("gc")
@json_option
@pass_ctx
def files_gc(ctx: Ctx, as_json: bool) -> None:
    """Delete blocks no pinned file needs."""
    _files_call(ctx, "/v1/files/gc", {}, as_json, "freed {freed_bytes} bytes")


@cli.command()
@click.option("--no-open", is_flag=True, help="Only print the link; do not open a browser.")
@json_option
@pass_ctx
def dashboard(ctx: Ctx, no_open: bool, as_json: bool) -> None:
    """Print (and open, on a desktop) a one-time login link to the web dashboard."""
    with ctx.client() as c:
        data = c.request("POST", "/v1/dashboard/login")
    quiet = as_json or ctx.as_json
    opened = False
    if not (no_open or quiet):
        from teammesh.node.api.dashboard import open_browser

        opened = open_browser(data["url"])
    data["opened"] = opened
    emit(ctx, as_json, data, lambda: click.echo(
        f"{data['url']}\n(one-time link, valid {data['expires_in_s']:.0f} s"
        f"{'; opened in your browser' if opened else ''})"))


@cli.command()
@click.option("--timeout", default=5.0, show_default=True,
              help="Seconds to wait for each network check.")
@json_option
@pass_ctx
def doctor(ctx: Ctx, timeout: float, as_json: bool) -> None:
    """Check this node's setup; print each problem with its fix (exit 1 if any fails)."""
    from teammesh.node.cli.doctor import render, run_doctor

    report = run_doctor(ctx.home, timeout_s=timeout)
    emit(ctx, as_json, report, lambda: render(report, console()))
    if not report["ok"]:
        sys.exit(1)


@cli.command()
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@json_option
@pass_ctx
def top(ctx: Ctx, interval: float, once: bool, as_json: bool) -> None:
    """A live view of the team's peers and this node's tasks (Ctrl-C to leave)."""
    from teammesh.node.cli.top import run_top, snapshot

    with ctx.client() as c:
        if as_json or ctx.as_json:
            click.echo(json.dumps(snapshot(c), default=str))
            return
        run_top(c, console(), interval_s=max(0.2, interval), once=once)


@cli.group()
def bridge() -> None:
    """The team's Cloudflare bridge (Worker)."""


@bridge.command("dev")
@click.option("--port", type=int, default=None, help="Port on 127.0.0.1 (default: free).")
@click.option("--state", "state", type=click.Path(path_type=Path), default=None,
              help="Where the local Worker keeps its queue, cache and R2 data.")
@pass_ctx
def bridge_dev(ctx: Ctx, port: int | None, state: Path | None) -> None:
    """Run the Worker locally (workerd, no Cloudflare account) with this team's key."""
    from teammesh.node.bridge.dev import run_bridge_dev
    from teammesh.node.core.config import load_config
    from teammesh.node.core.journal import Journal

    key_hex = load_config(ctx.home).get("bridge", "key")
    if not key_hex:
        journal = Journal(ctx.home.journal_file)
        try:
            # the Worker holds the team's master key; a member's own key is derived
            # from it (protocols/bridgekey.py) and cannot run a bridge for the team
            raw = journal.get("bridge_master")
        finally:
            journal.close()
        if raw is None:
            raise TeammeshError("this node holds no bridge master key: run `bridge dev` on"
                                " an admin's node (the team creator's), or set [bridge] key")
        key_hex = raw.hex()
    sys.exit(run_bridge_dev(port=port, key_hex=key_hex,
                            persist_dir=state or ctx.home.path / "bridge-dev"))


def parse_duration(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except (ValueError, IndexError) as exc:
        raise TeammeshError(f"bad duration {text!r}; use e.g. 90s, 30m, 1h, 2d") from exc


def setup_logging(verbose: int, log_format: str = "text") -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    if log_format == "json":
        from teammesh.node.core.logjson import JsonFormatter

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("teammesh").setLevel(min(level, logging.INFO))


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except TeammeshError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        click.echo(f"error: {exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
