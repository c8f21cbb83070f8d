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
    def __init__(self, home: Path | None, as_json: bool, verbose: int) -> None:
        from .config import Home, default_home

        self.home = Home(home if home is not None else default_home())
        self.as_json = as_json
        self.verbose = verbose

    def client(self) -> Any:
        from .client import Client

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
@click.version_option(package_name="teammesh")
@click.pass_context
def cli(click_ctx: click.Context, home: Path | None, as_json: bool, verbose: int) -> None:
    """teammesh: share cores, tasks and files across your team's machines."""
    click_ctx.obj = Ctx(home, as_json, verbose)


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
    from .journal import Journal
    from .membership import Membership

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
@json_option
@pass_ctx
def join(ctx: Ctx, invite: str, as_json: bool) -> None:
    """Join a team with an INVITE from `teammesh team invite`."""
    import trio

    from .journal import Journal
    from .membership import join as do_join

    identity = ctx.home.identity()
    journal = Journal(ctx.home.journal_file)
    quiet = as_json or ctx.as_json
    try:
        info = trio.run(do_join, ctx.home, journal, identity, invite,
                        (lambda s: None) if quiet else (lambda s: click.echo(s, err=True)))
    finally:
        journal.close()
    emit(ctx, as_json, {"team": info.team_id, "name": info.name, "peer_id": identity.peer_id},
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

    from .config import load_config
    from .daemon import UpOptions, run_daemon

    ctx.home.require()
    setup_logging(ctx.verbose)
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
    if pull and not options.listen:
        options = UpOptions(["/ip4/127.0.0.1/tcp/0"], options.bootstrap, options.api,
                            options.slots, True, options.bridge)

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
    from .demo import run_demo

    result = run_demo(nodes, keep=keep, quiet=as_json or ctx.as_json)
    emit(ctx, as_json, result, lambda: None)


def parse_duration(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except (ValueError, IndexError) as exc:
        raise TeammeshError(f"bad duration {text!r}; use e.g. 90s, 30m, 1h, 2d") from exc


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
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
