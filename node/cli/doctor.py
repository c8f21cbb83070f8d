"""`teammesh doctor`: check a node's setup and say how to fix what is wrong.

Each check returns a :class:`Check` with a :class:`Status`; a FAIL carries the fix. The
checks run in order, and a check whose precondition failed (no config, no team) is
skipped rather than failing again for the same cause. Checks that need the network use
short timeouts and touch only what the node itself would: the bootstrap addresses, this
node's own addresses, the configured Kubo RPC API, S3 endpoint and bridge.

Clock skew is measured against the team and the services: when the node is running,
against its peers (each capability ad carries its author's wall clock; the node lists
each peer's offset, and the median of them is the team's time, so one bad clock cannot
make ours look wrong), and against the HTTP ``Date`` of the bridge and the S3 endpoint
(one-second resolution). The bridge refuses signatures more than its MAX_SKEW_S (300 s by
default) away, and certificates and invites expire by the wall clock.
"""

from __future__ import annotations

import enum
import json
import os
import socket
import stat
import statistics
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teammesh.protocols.errors import TeammeshError

if TYPE_CHECKING:
    from teammesh.node.core.config import Config, Home

CERT_WARN_S = 7 * 86400  # a certificate expiring within a week is worth a warning
SKEW_FAIL_S = 60.0  # well inside the bridge's 300 s, so a drifting clock is caught early
SKEW_WARN_S = 5.0
PRIVATE_FILES = ("identity.key", "api.token", "config.toml", "journal.db", "team-root.key")


class Status(enum.Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail,
                "fix": self.fix}


@dataclass(slots=True)
class _State:
    """What earlier checks learned, for the later ones."""

    home: Home
    timeout_s: float
    config: Config | None = None
    identity: Any = None
    membership: Any = None
    journal: Any = None
    api: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    skews: list[tuple[str, float]] | None = None
    # peers' clocks minus ours, from the running node's peer list
    peer_offsets: dict[str, float] | None = None


def run_doctor(home: Home, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """Run every check; returns ``{"ok", "home", "checks": [...]}`` (ok: no FAIL)."""
    state = _State(home, timeout_s, skews=[])
    checks: list[Check] = []
    try:
        for fn in (check_home, check_permissions, check_config, check_identity,
                   check_membership, check_node_running, check_bootstrap, check_dialable,
                   check_kubo, check_s3, check_bridge, check_clock):
            checks.extend(fn(state))
    finally:
        if state.journal is not None:
            state.journal.close()
    return {"ok": all(c.status is not Status.FAIL for c in checks), "home": str(home.path),
            "checks": [c.to_json() for c in checks]}


# --- the checks -------------------------------------------------------------------------
def check_home(s: _State) -> list[Check]:
    path = s.home.path
    if not path.is_dir():
        return [Check("home", Status.FAIL, f"{path} does not exist",
                      f"run `teammesh --home {path} init`")]
    if not s.home.initialized:
        return [Check("home", Status.FAIL, f"{path} is not a teammesh home (no identity or"
                      " config)", f"run `teammesh --home {path} init`")]
    return [Check("home", Status.PASS, str(path))]


def check_permissions(s: _State) -> list[Check]:
    path = s.home.path
    if not s.home.initialized:
        return []
    problems: list[str] = []
    fixes: list[str] = []
    uid = os.getuid()
    mode = path.stat().st_mode
    if mode & 0o022:
        problems.append(f"{path} is writable by others ({stat.filemode(mode)})")
        fixes.append(f"chmod 700 {path}")
    for name in PRIVATE_FILES:
        f = path / name
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        if st.st_uid != uid:
            problems.append(f"{name} belongs to uid {st.st_uid}, not to you ({uid})")
            fixes.append(f"chown {uid} {f}")
        if st.st_mode & 0o077:
            problems.append(f"{name} is readable by others ({stat.filemode(st.st_mode)})")
            fixes.append(f"chmod 600 {f}")
    if problems:
        return [Check("file permissions", Status.FAIL, "; ".join(problems),
                      " && ".join(fixes) + " (the node also tightens them when it starts)")]
    return [Check("file permissions", Status.PASS, "home 0700-safe, secrets 0600")]


def check_config(s: _State) -> list[Check]:
    from teammesh.node.core.config import load_config

    if not s.home.initialized:
        return []
    try:
        s.config = load_config(s.home)
    except TeammeshError as exc:
        return [Check("config", Status.FAIL, str(exc),
                      f"edit {s.home.config_file} (or unset the TEAMMESH_* variable named)")]
    return [Check("config", Status.PASS, f"{s.home.config_file} is valid")]


def check_identity(s: _State) -> list[Check]:
    if not s.home.initialized:
        return []
    try:
        s.identity = s.home.identity()
    except TeammeshError as exc:
        return [Check("identity", Status.FAIL, str(exc),
                      "restore identity.key from a backup, or re-init a fresh home and"
                      " join again")]
    return [Check("identity", Status.PASS, f"peer id {s.identity.peer_id}")]


def check_membership(s: _State) -> list[Check]:
    if s.identity is None:
        return []
    from teammesh.node.core.journal import Journal
    from teammesh.node.p2p.membership import Membership

    try:
        s.journal = Journal(s.home.journal_file)
        s.membership = Membership(s.home, s.journal, s.identity)
        summary = s.membership.summary()
    except TeammeshError as exc:
        return [Check("team certificate", Status.FAIL, str(exc),
                      "restore the home from a backup, or join again with a new invite")]
    if summary is None:
        return [Check("team certificate", Status.FAIL, "this node is in no team",
                      "`teammesh team create NAME` (first node) or `teammesh join INVITE`")]
    left = summary["cert_expires"] - time.time()
    name = f"team {summary['name']!r}"
    if left <= 0:
        return [Check("team certificate", Status.FAIL,
                      f"{name}: the membership certificate expired"
                      f" {_ago(-left)} ago", "ask an admin for a new invite and"
                      " `teammesh join` it (the node renews it by itself while it runs)")]
    if left < CERT_WARN_S:
        return [Check("team certificate", Status.WARN,
                      f"{name}: the certificate expires in {_ago(left)}",
                      "start the node (`teammesh up`) so it renews, or join again")]
    return [Check("team certificate", Status.PASS,
                  f"{name}, roles {', '.join(summary['roles']) or 'member'};"
                  f" valid {_ago(left)} more")]


def check_node_running(s: _State) -> list[Check]:
    if not s.home.initialized:
        return []
    if not s.home.api_file.exists():
        return [Check("node", Status.WARN, "the node is not running here",
                      "`teammesh up` (or start the service); the checks below that need"
                      " a running node are skipped")]
    try:
        s.api = json.loads(s.home.api_file.read_text())
        from teammesh.client import Client

        with Client.from_home(s.home.path) as c:
            s.status = c.status()
            peers = c.peers()
        s.peer_offsets = {p["peer_id"]: float(p["clock_offset_s"]) for p in peers
                          if p.get("clock_offset_s") is not None}
    except (TeammeshError, ValueError, OSError) as exc:
        s.api = None
        return [Check("node", Status.FAIL, f"api.json is there but the node does not answer"
                      f" ({exc})", "the node was killed: `teammesh up` again (it removes the"
                      " stale file)")]
    st = s.status
    return [Check("node", Status.PASS, f"running (pid {st['pid']}, up {st['uptime_s']:.0f} s),"
                  f" {st['live_peers']} live peers, api {st['api']}")]


def _bootstrap_addrs(s: _State) -> list[str]:
    addrs: list[str] = list(s.config.get("node", "bootstrap")) if s.config else []
    if s.journal is not None:
        saved = s.journal.get("bootstrap")
        if saved:
            addrs += [a for a in json.loads(saved) if a not in addrs]
    own = s.identity.peer_id if s.identity is not None else None
    return [a for a in addrs if not own or not a.endswith(f"/p2p/{own}")]


def check_bootstrap(s: _State) -> list[Check]:
    if s.config is None or s.membership is None or s.membership.summary() is None:
        return []
    addrs = _bootstrap_addrs(s)
    if not addrs:
        if s.membership.is_admin:
            return [Check("bootstrap peers", Status.PASS, "none needed: this node created"
                          " the team (members dial it)")]
        return [Check("bootstrap peers", Status.FAIL, "no bootstrap address is known",
                      "add a member's full multiaddr to node.bootstrap in config.toml, or"
                      " `teammesh up --bootstrap ADDR`")]
    reachable: list[str] = []
    failed: list[str] = []
    for addr in addrs:
        err = _tcp_probe(addr, s.timeout_s)
        (failed if err else reachable).append(f"{addr} ({err})" if err else addr)
    if s.status is not None and s.status.get("live_peers"):
        # a running node that already sees its team is fine whatever the old addresses do
        return [Check("bootstrap peers", Status.PASS if reachable else Status.WARN,
                      f"{len(reachable)} of {len(addrs)} reachable; the node sees"
                      f" {s.status['live_peers']} live peers"
                      + (f"; unreachable: {'; '.join(failed)}" if failed else ""),
                      "" if reachable else "update node.bootstrap to a current member"
                      " address (the node's peer list covers it while it runs)")]
    if not reachable:
        return [Check("bootstrap peers", Status.FAIL,
                      f"none of {len(addrs)} reachable: {'; '.join(failed)}",
                      "check the network/firewall to those hosts, or set node.bootstrap to"
                      " a running member's address (`teammesh status` on it prints them)")]
    return [Check("bootstrap peers", Status.PASS,
                  f"{len(reachable)} of {len(addrs)} reachable"
                  + (f"; unreachable: {'; '.join(failed)}" if failed else ""))]


def check_dialable(s: _State) -> list[Check]:
    if s.status is None:
        if s.config is None:
            return []
        # not running: can the node bind where it will listen?
        busy = []
        for addr in s.config.get("node", "listen"):
            hp = _host_port(addr)
            if hp is None or hp[1] == 0:
                continue
            err = _bind_probe(*hp)
            if err:
                busy.append(f"{addr}: {err}")
        if busy:
            return [Check("listen address", Status.FAIL, "; ".join(busy),
                          "stop what holds the port, or change node.listen in config.toml")]
        return [Check("dialable", Status.SKIP, "the node is not running; its listen"
                      " addresses are free to bind")]
    st = s.status
    reach = st["reachability"]
    own_ok = [a for a in st["addrs"] if not _tcp_probe(a, s.timeout_s)]
    if not own_ok:
        return [Check("dialable", Status.FAIL, "none of this node's own addresses accepts a"
                      f" TCP connection: {', '.join(st['addrs'])}",
                      "check node.listen and the local firewall (port 4117/tcp by default)")]
    if reach["reachable"]:
        return [Check("dialable", Status.PASS, f"{reach['inbound_peers']} peers have dialled"
                      f" this node; listening on {', '.join(own_ok)}")]
    return [Check("dialable", Status.WARN, reach["note"],
                  "forward the listen port (4117/tcp) to this machine, or run with --pull"
                  " and a bridge so work still reaches it")]


def check_kubo(s: _State) -> list[Check]:
    if s.config is None or not s.config.get("ipfs", "api"):
        return [Check("kubo", Status.SKIP, "not configured (ipfs.api)")] if s.config else []
    api = s.config.get("ipfs", "api")
    hp = _host_port(api)
    if hp is None:
        return [Check("kubo", Status.FAIL, f"ipfs.api = {api!r} is not /ip4|ip6|dns/HOST/tcp/PORT",
                      'set ipfs.api to e.g. "/ip4/127.0.0.1/tcp/5001"')]
    import httpx

    host = f"[{hp[0]}]" if ":" in hp[0] else hp[0]
    try:
        r = httpx.post(f"http://{host}:{hp[1]}/api/v0/version", timeout=s.timeout_s,
                       trust_env=False)
        r.raise_for_status()
        version = r.json().get("Version", "?")
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return [Check("kubo", Status.FAIL, f"the Kubo RPC API at {api} does not answer: {exc}",
                      "start the IPFS daemon (`ipfs daemon`), or fix/clear ipfs.api")]
    return [Check("kubo", Status.PASS, f"{api} answers, version {version}")]


def check_s3(s: _State) -> list[Check]:
    if s.config is None:
        return []
    endpoint = s.config.get("r2", "endpoint")
    if not endpoint:
        return [Check("s3 mirror", Status.SKIP, "not configured (r2.endpoint)")]
    import boto3
    import botocore.exceptions as bx
    from botocore.config import Config as BotoConfig

    bucket = s.config.get("r2", "bucket")
    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=s.config.get("r2", "access_key_id"),
        aws_secret_access_key=s.config.get("r2", "secret_access_key"),
        config=BotoConfig(region_name=s.config.get("r2", "region"), signature_version="s3v4",
                          s3={"addressing_style": "path"}, connect_timeout=s.timeout_s,
                          read_timeout=s.timeout_s, retries={"total_max_attempts": 1}))
    try:
        resp = client.head_bucket(Bucket=bucket)
        _note_skew(s, "s3", resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}))
    except bx.ClientError as exc:
        meta = exc.response.get("ResponseMetadata", {})
        _note_skew(s, "s3", meta.get("HTTPHeaders", {}))
        code = str(exc.response.get("Error", {}).get("Code", meta.get("HTTPStatusCode", "")))
        if code in ("404", "NoSuchBucket", "NotFound"):
            return [Check("s3 mirror", Status.WARN, f"{endpoint}: bucket {bucket!r} does not"
                          " exist yet (credentials accepted)",
                          "the node creates it on the first upload; or create it yourself")]
        if code in ("403", "401", "AccessDenied", "InvalidAccessKeyId",
                    "SignatureDoesNotMatch", "Forbidden"):
            return [Check("s3 mirror", Status.FAIL, f"{endpoint} refused our credentials for"
                          f" bucket {bucket!r} ({code})",
                          "set r2.access_key_id and r2.secret_access_key (or"
                          " TEAMMESH_R2_SECRET_ACCESS_KEY) to a token with read/write on"
                          " the bucket")]
        return [Check("s3 mirror", Status.FAIL, f"{endpoint}: {code}: {exc}",
                      "check r2.endpoint and r2.bucket")]
    except (bx.BotoCoreError, ValueError) as exc:
        return [Check("s3 mirror", Status.FAIL, f"{endpoint} is unreachable: {exc}",
                      "check r2.endpoint (https://ACCOUNT.r2.cloudflarestorage.com) and the"
                      " network or proxy")]
    return [Check("s3 mirror", Status.PASS, f"{endpoint}: bucket {bucket!r} reachable with"
                  " these credentials")]


def check_bridge(s: _State) -> list[Check]:
    if s.config is None:
        return []
    url = s.config.get("bridge", "url")
    if not url:
        return [Check("bridge", Status.SKIP, "not configured (bridge.url)")]
    key_hex = s.config.get("bridge", "key")
    try:
        key = bytes.fromhex(key_hex) if key_hex else (
            s.membership.bridge_key if s.membership is not None else None)
    except ValueError:
        return [Check("bridge", Status.FAIL, "bridge.key is not hex",
                      "remove bridge.key (the key from joining is used) or fix it")]
    import httpx
    from teammesh.node.bridge.client import sign_request

    peer = s.identity.peer_id if s.identity is not None else ""
    out: list[Check] = []
    proxy = s.config.get("bridge", "proxy") or None
    try:
        with httpx.Client(base_url=url.rstrip("/"), timeout=s.timeout_s, proxy=proxy,
                          trust_env=proxy is None) as http:
            r = http.get("/health")
            _note_skew(s, "bridge", r.headers)
            health = r.json() if r.status_code == 200 else {}
            if not health.get("ok"):
                return [Check("bridge health", Status.FAIL, f"{url}/health answered"
                              f" {r.status_code}: {r.text[:200]}",
                              "check the Worker's deployment (`wrangler deploy`) and its"
                              " logs (`wrangler tail`)")]
            if not health.get("key_configured", True):
                out.append(Check("bridge health", Status.FAIL, f"{url} has no BRIDGE_KEY",
                                 "`teammesh team bridge-key` on an admin, then `wrangler"
                                 " secret put BRIDGE_KEY`"))
            else:
                out.append(Check("bridge health", Status.PASS,
                                 f"{url} ok, version {health.get('version', '?')}"))
            if key is None:
                out.append(Check("bridge signature", Status.FAIL, "this node has no bridge key",
                                 "join again with a current invite (it carries the key), or"
                                 " set bridge.key"))
                return out
            target = "/v1/tasks?limit=1"
            signed = http.get(target, headers=sign_request(key, peer, "GET", target, b""))
            _note_skew(s, "bridge", signed.headers)
    except httpx.HTTPError as exc:
        return [*out, Check("bridge health", Status.FAIL, f"{url} is unreachable: {exc}",
                            "check bridge.url, the network, or bridge.proxy")]
    if signed.status_code == 200:
        out.append(Check("bridge signature", Status.PASS, "the bridge accepts this node's"
                         " signed requests"))
    else:
        try:
            err = signed.json().get("error", {})
        except ValueError:
            err = {}
        code = err.get("code", signed.status_code)
        fix = {"stale_timestamp": "set the clock right (enable NTP: `timedatectl"
                                  " set-ntp true`)",
               "stale_key": "the team rotated its bridge key: join again with a new invite"}
        out.append(Check("bridge signature", Status.FAIL, f"the bridge refused a signed"
                         f" request ({code}): {err.get('message', signed.text[:200])}",
                         fix.get(str(code), "the Worker's BRIDGE_KEY must be this team's"
                                 " master key (`teammesh team bridge-key` on an admin)")))
    return out


def check_clock(s: _State) -> list[Check]:
    outliers: list[str] = []
    if s.peer_offsets and s.skews is not None:
        # The team's time is the median peer clock: ours is judged against it, and a peer
        # far from it is named (its machine is the one to fix).
        team = statistics.median_low(s.peer_offsets.values())
        s.skews.append((f"peers (median of {len(s.peer_offsets)})", round(-team, 1)))
        outliers = [f"{peer} {off - team:+.0f} s" for peer, off in sorted(
            s.peer_offsets.items(), key=lambda x: -abs(x[1] - team))
            if abs(off - team) > SKEW_WARN_S]
    if not s.skews:
        if s.config is None:
            return []
        return [Check("clock", Status.SKIP, "no time source to compare with (no peer has"
                      " sent its clock, and no bridge or S3 endpoint is configured)")]
    worst_src, worst = max(s.skews, key=lambda x: abs(x[1]))
    text = ", ".join(f"{src} {skew:+.0f} s" for src, skew in s.skews)
    fix = "enable time sync: `timedatectl set-ntp true` (or run chronyd/ntpd)"
    if abs(worst) > SKEW_FAIL_S:
        return [Check("clock", Status.FAIL, f"this clock is {abs(worst):.0f} s off"
                      f" ({worst_src}); signatures and certificates will be refused", fix)]
    if abs(worst) > SKEW_WARN_S:
        return [Check("clock", Status.WARN, f"skew {text}", fix)]
    if outliers:
        return [Check("clock", Status.WARN, f"this clock agrees with the team ({text}), but"
                      f" some peers' clocks are off: {', '.join(outliers[:5])}",
                      "enable time sync on those peers' machines: `timedatectl set-ntp"
                      " true` (or run chronyd/ntpd) there")]
    return [Check("clock", Status.PASS, f"skew within {SKEW_WARN_S:g} s ({text})")]


# --- helpers ------------------------------------------------------------------------------
def _note_skew(s: _State, source: str, headers: Any) -> None:
    date = headers.get("date") if headers is not None else None
    if not date or s.skews is None:
        return
    try:
        theirs = parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return
    # their Date is truncated to the second: half a second is the expected offset
    s.skews.append((source, round(time.time() - theirs - 0.5, 1)))


def _host_port(addr: str) -> tuple[str, int] | None:
    parts = addr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") \
            or parts[2] != "tcp":
        return None
    try:
        return parts[1], int(parts[3])
    except ValueError:
        return None


def _tcp_probe(addr: str, timeout_s: float) -> str | None:
    """None when a TCP connection to the multiaddr's host and port succeeds, else why not."""
    hp = _host_port(addr)
    if hp is None:
        return "not a /ip4|ip6|dns/HOST/tcp/PORT address"
    host, port = hp
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as exc:
        return exc.strerror or str(exc)


def _bind_probe(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _ago(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} hours"
    if seconds >= 120:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds:.0f} s"


def render(report: dict[str, Any], console: Any) -> None:
    """The report as a rich table: one row per check, the fix under each failure."""
    from rich.table import Table
    from rich.text import Text

    styles = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
    table = Table("check", "result", "detail", title=f"teammesh doctor: {report['home']}",
                  title_justify="left")
    for c in report["checks"]:
        detail = Text(c["detail"])
        if c["fix"] and c["status"] in ("fail", "warn"):
            detail.append("\nfix: ", style="bold")
            detail.append(c["fix"])
        table.add_row(c["name"], Text(c["status"].upper(), style=styles[c["status"]]), detail)
    console.print(table)
    failed = sum(c["status"] == "fail" for c in report["checks"])
    console.print("[green]all checks passed[/green]" if report["ok"] else
                  f"[bold red]{failed} check(s) failed[/bold red]")


# --- the systemd service ------------------------------------------------------------------
# Sandboxing that needs a mount namespace or capabilities a user's service manager may not
# have: left out of user units (NoNewPrivileges, ProtectSystem and PrivateTmp stay; on a
# system without unprivileged user namespaces, use a system unit).
SYSTEM_ONLY_OPTIONS = ("PrivateDevices=", "ProtectKernelTunables=", "ProtectKernelModules=",
                       "ProtectKernelLogs=", "ProtectControlGroups=", "ProtectClock=",
                       "ProtectHostname=")
UNIT_NAME = "teammesh.service"


def service_unit(*, home: str, executable: str | tuple[str, ...], scope: str,
                 user: str | None = None, up_args: tuple[str, ...] = ()) -> str:
    """The systemd unit text for a node in ``home`` (scope "system" or "user").

    Args:
        home: the node's home directory (absolute).
        executable: the absolute path of the ``teammesh`` command, or the command as
            a tuple (``(python, "-m", "teammesh.node.cli.main")``).
        scope: "system" (/etc/systemd/system, runs as ``user``) or "user"
            (~/.config/systemd/user, runs as the user who installs it).
        user: the account a system unit runs as.
        up_args: extra arguments for ``teammesh up``.
    Raises:
        TeammeshError: a bad scope, or a system unit without a user.
    """
    import shlex
    from importlib import resources

    if scope not in ("system", "user"):
        raise TeammeshError(f"service scope must be 'system' or 'user', not {scope!r}")
    if scope == "system" and not user:
        raise TeammeshError("a system service needs the user it runs as")
    template = resources.files("teammesh.node.api").joinpath(
        "static", "teammesh.service.in").read_text()
    command = (executable,) if isinstance(executable, str) else executable
    exec_start = " ".join(shlex.quote(a) for a in (*command, "--home", home, "up", *up_args))
    text = template.format(
        scope=scope, home=home, exec_start=exec_start,
        journal_flag="" if scope == "system" else "--user ",
        user_lines=f"User={user}\nGroup={user}\n" if scope == "system" else "",
        wanted_by="multi-user.target" if scope == "system" else "default.target")
    if scope == "user":
        text = "".join(line for line in text.splitlines(keepends=True)
                       if not line.startswith(SYSTEM_ONLY_OPTIONS))
    return text


def service_path(scope: str) -> Path:
    """Where the unit goes for ``scope``."""
    if scope == "system":
        return Path("/etc/systemd/system") / UNIT_NAME
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user" / UNIT_NAME


def install_service(unit: str, scope: str, *, start: bool = True) -> dict[str, Any]:
    """Write the unit, reload systemd, enable it and (with ``start``) start it now.

    Raises:
        TeammeshError: no systemd here, no permission to write the unit, or systemctl
            failed (its message is included).
    """
    import shutil
    import subprocess

    path = service_path(scope)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(unit)
    except PermissionError as exc:
        raise TeammeshError(f"cannot write {path} ({exc.strerror}): a system service needs"
                            " root (sudo), or use --service user") from exc
    if shutil.which("systemctl") is None:
        raise TeammeshError(f"systemctl is not available here: the unit is at {path}, but"
                            " nothing started it (start the node with `teammesh up`)")
    base = ["systemctl"] + (["--user"] if scope == "user" else [])
    steps = [[*base, "daemon-reload"], [*base, "enable", *(["--now"] if start else []),
                                        UNIT_NAME]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise TeammeshError(f"`{' '.join(cmd)}` failed: {msg[-1] if msg else proc.returncode}"
                                f" (the unit is at {path})")
    return {"unit": str(path), "scope": scope, "started": start}


def service_command() -> tuple[str, ...]:
    """How a unit starts this installation's CLI: the ``teammesh`` script that is running
    now if it is one, else this Python with ``-m`` (a venv's python is absolute)."""
    import sys

    argv0 = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "teammesh" and argv0.is_file():
        return (str(argv0),)
    return (str(Path(sys.executable).absolute()), "-m", "teammesh.node.cli.main")


def install_node_service(home: Path, scope: str, *, up_args: tuple[str, ...] = (),
                         start: bool = True) -> dict[str, Any]:
    """Render and install the unit for the node in ``home``, running as the current user
    (``teammesh join INVITE --service``). Returns {unit, scope, started, exec}."""
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    command = service_command()
    unit = service_unit(home=str(home.absolute()), executable=command, scope=scope,
                        user=user if scope == "system" else None, up_args=up_args)
    result = install_service(unit, scope, start=start)
    result["exec"] = " ".join(command)
    return result
