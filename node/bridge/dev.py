"""Run the Cloudflare bridge Worker locally (workerd on loopback, through Miniflare).

:func:`open_bridge_dev` is a trio async context manager for tests and the daemon;
:func:`run_bridge_dev` is the blocking form behind ``teammesh bridge dev``.

Each run gets a private working directory (``run_dir``: symlinks to bridge/'s config,
sources and node_modules, plus its own ``.dev.vars`` holding the key), so runs with
different keys (tests, several teams, other developers' runs) never share or rewrite one
``bridge/.dev.vars``.

Why not ``wrangler dev``: it puts a second workerd (its ProxyWorker) in front of the
Worker's, and under load that hop loses requests (503 "Your worker restarted
mid-request", or a connection closed without an answer). workerd closes a keep-alive
connection after 5 s idle, and the proxy's workerd drops pooled connections after the
same 5 s: when load pauses for ~5 s (a slow tail, the start of the next burst) the proxy
sends requests on connections the Worker's workerd is closing, and wrangler's proxy
retries only GET and HEAD (docs/BRIDGE.md, "Why not wrangler dev", has the numbers).
:func:`open_bridge_dev` therefore runs ``serve.mjs`` (:data:`SERVE_JS`, written into the
run directory): Miniflare with wrangler's own reading of wrangler.jsonc
(``unstable_getMiniflareWorkerOptions``), listening on 127.0.0.1:port itself; the
client talks to the Worker's workerd directly. State is in ``persist_dir``/v3, where
``wrangler dev --persist-to persist_dir`` keeps it too. :func:`wrangler_command` (plain
``wrangler dev``) stays for manual use and tests that want wrangler itself.

The server is started in its own session/process group (``setsid``): its process tree
is node -> workerd, and killing only the top pid can leave workerd running, so stopping
sends SIGTERM to the whole group and SIGKILL after 5 s. Telemetry and the cf.json fetch
are turned off; nothing but 127.0.0.1 is contacted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio
from teammesh.protocols.errors import TeammeshError

__all__ = [
    "BridgeDevError",
    "default_bridge_dir",
    "free_port",
    "open_bridge_dev",
    "prepare_run_dir",
    "run_bridge_dev",
    "serve_command",
    "wrangler_command",
    "wrangler_env",
]

STOP_GRACE_S = 5.0
# `teammesh bridge dev` is one machine's local Worker: a member's token bucket of 50/s
# (wrangler.jsonc, for production) would only turn a local load test into 429s.
DEV_VARS = {"RATE_PER_S": "1000", "RATE_BURST": "2000"}
START_TIMEOUT_S = 90.0
NPM_TIMEOUT_S = 600.0


class BridgeDevError(TeammeshError):
    """The local bridge could not be installed or started."""


def default_bridge_dir() -> Path:
    """bridge/ of this checkout (node/bridge/dev.py -> ../../bridge)."""
    return Path(__file__).resolve().parents[2] / "bridge"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wrangler_env(persist_dir: Path | None = None) -> dict[str, str]:
    """The environment for ``wrangler dev``. With ``persist_dir``, the run gets its own dev
    registry: every ``wrangler dev`` on a machine otherwise shares one under the Worker's
    name, and concurrent runs unregister each other's Durable Objects."""
    env = dict(os.environ)
    if persist_dir is not None:
        env["WRANGLER_REGISTRY_PATH"] = str(Path(persist_dir) / "registry")
    env.update({
        "WRANGLER_SEND_METRICS": "false",
        "CLOUDFLARE_CF_FETCH_ENABLED": "false",
        "WRANGLER_LOG": env.get("WRANGLER_LOG", "info"),
        "NO_COLOR": "1",
        "CI": env.get("CI", "1"),
    })
    # A developer's Cloudflare credentials are never needed for --local.
    for name in ("CLOUDFLARE_API_TOKEN", "CLOUDFLARE_API_KEY", "CLOUDFLARE_ACCOUNT_ID"):
        env.pop(name, None)
    return env


def wrangler_command(bridge_dir: Path, port: int, persist_dir: Path,
                     extra_vars: dict[str, str] | None = None) -> list[str]:
    node = shutil.which("node")
    if node is None:
        raise BridgeDevError("node is not installed; the bridge needs Node.js 20 (see docs/BRIDGE.md)")
    cli = bridge_dir / "node_modules" / "wrangler" / "bin" / "wrangler.js"
    cmd = [node, str(cli), "dev", "--local", "--ip", "127.0.0.1", "--port", str(port),
           "--persist-to", str(persist_dir), "--show-interactive-dev-session=false"]
    for name, value in (extra_vars or {}).items():
        cmd += ["--var", f"{name}:{value}"]
    return cmd


# The local server: Miniflare (bridge/node_modules/miniflare, the version wrangler uses)
# with the options wrangler derives from wrangler.jsonc (bindings, Durable Object classes
# with SQLite, vars, compatibility date), the sources as ES modules from src/ (no bundling
# step: src/ is plain ES modules with static imports), vars from the command line and the
# key from .dev.vars (not the command line: other users can read a process's argv).
SERVE_JS = r"""// written by teammesh (node/bridge/dev.py): the Worker in workerd, no wrangler dev proxy
import { readFileSync } from "node:fs";
import { Log, LogLevel, Miniflare } from "miniflare";
import { unstable_getMiniflareWorkerOptions } from "wrangler";

const [host, port, persistRoot, varsJson] = process.argv.slice(2);
const secrets = {};
for (const line of readFileSync(".dev.vars", "utf8").split("\n")) {
  const eq = line.indexOf("=");
  if (eq > 0) secrets[line.slice(0, eq).trim()] = line.slice(eq + 1).trim();
}
const { workerOptions, main } = unstable_getMiniflareWorkerOptions("wrangler.jsonc");
const mf = new Miniflare({
  ...workerOptions,
  modules: true,
  scriptPath: main,
  modulesRoot: ".",
  modulesRules: [{ type: "ESModule", include: ["**/*.js"] }],
  bindings: { ...workerOptions.bindings, ...JSON.parse(varsJson), ...secrets },
  host,
  port: Number(port),
  defaultPersistRoot: persistRoot,
  cf: false,
  log: new Log(LogLevel.INFO),
});
const url = await mf.ready;
console.log(`teammesh bridge dev: ready on ${url}`);
let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  await mf.dispose();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
"""


def serve_command(run_dir: Path, port: int, persist_dir: Path,
                  extra_vars: dict[str, str] | None = None) -> list[str]:
    """The command that serves the Worker from ``run_dir`` (see :data:`SERVE_JS`) on
    127.0.0.1:``port`` with its state under ``persist_dir``/v3 (wrangler's layout)."""
    node = shutil.which("node")
    if node is None:
        raise BridgeDevError("node is not installed; the bridge needs Node.js 20 (see docs/BRIDGE.md)")
    return [node, str(Path(run_dir) / "serve.mjs"), "127.0.0.1", str(port),
            str(Path(persist_dir) / "v3"), json.dumps(extra_vars or {})]


def ensure_installed(bridge_dir: Path) -> None:
    """``npm ci`` in bridge/ unless node_modules already has wrangler."""
    if (bridge_dir / "node_modules" / "wrangler" / "bin" / "wrangler.js").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise BridgeDevError("npm is not installed; the bridge needs Node.js 20 and npm")
    try:
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=bridge_dir, check=True,
                       timeout=NPM_TIMEOUT_S, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace")[-500:]
        raise BridgeDevError(f"`npm ci` in {bridge_dir} failed: {tail}") from exc
    except subprocess.TimeoutExpired as exc:
        raise BridgeDevError(f"`npm ci` in {bridge_dir} took longer than {NPM_TIMEOUT_S:g} s") from exc


def write_dev_vars(bridge_dir: Path, key_hex: str) -> None:
    bytes.fromhex(key_hex)  # raises ValueError on a bad key
    path = bridge_dir / ".dev.vars"
    text = f"BRIDGE_KEY={key_hex}\n"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        tmp.replace(path)


RUN_DIR_LINKS = ("wrangler.jsonc", "package.json", "src", "node_modules")


def prepare_run_dir(bridge_dir: Path, run_dir: Path, key_hex: str) -> Path:
    """A private directory to run the Worker in: symlinks to ``bridge_dir``'s config,
    sources and node_modules, a ``.dev.vars`` (mode 600) with this run's key, and
    ``serve.mjs`` (:data:`SERVE_JS`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_DIR_LINKS:
        link = run_dir / name
        target = (bridge_dir / name).resolve()
        if link.is_symlink() and link.resolve() == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    write_dev_vars(run_dir, key_hex)
    serve = run_dir / "serve.mjs"
    if not serve.exists() or serve.read_text() != SERVE_JS:
        serve.write_text(SERVE_JS)
    return run_dir


def _kill_group(proc: subprocess.Popen[bytes] | trio.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _health_ok(port: int) -> bool:
    import httpx

    try:
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0, trust_env=False)
        return r.status_code == 200 and bool(r.json().get("ok"))
    except (httpx.HTTPError, ValueError):
        return False


@contextlib.asynccontextmanager
async def open_bridge_dev(bridge_dir: str | Path, port: int | None, key_hex: str,
                          persist_dir: str | Path, *, extra_vars: dict[str, str] | None = None,
                          log_path: str | Path | None = None,
                          start_timeout: float = START_TIMEOUT_S) -> AsyncIterator[str]:
    """Start the Worker on 127.0.0.1:``port`` and yield its base URL.

    ``extra_vars`` override wrangler.jsonc vars (e.g. {"RATE_BURST": "1000"}). The
    server's output (Miniflare's request log, the Worker's console) goes to ``log_path``
    (default: ``persist_dir``/bridge-dev.log).
    """
    bridge_dir = Path(bridge_dir)
    persist_dir = Path(persist_dir)
    persist_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    await trio.to_thread.run_sync(ensure_installed, bridge_dir)
    run_dir = prepare_run_dir(bridge_dir, persist_dir / "worker", key_hex)
    log_file = Path(log_path) if log_path else persist_dir / "bridge-dev.log"
    log = await trio.to_thread.run_sync(open, log_file, "ab")
    try:
        proc = await trio.lowlevel.open_process(
            serve_command(run_dir, port, persist_dir, extra_vars), cwd=str(run_dir),
            env=wrangler_env(Path(persist_dir)), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()  # the child has its own copy of the descriptor
    try:
        deadline = trio.current_time() + start_timeout
        while True:
            if proc.returncode is not None:
                tail = log_file.read_text(errors="replace")[-1500:]
                raise BridgeDevError(f"the local bridge (Miniflare) exited with {proc.returncode}:\n{tail}")
            if await trio.to_thread.run_sync(_health_ok, port):
                break
            if trio.current_time() > deadline:
                raise BridgeDevError(f"the bridge did not answer /health on port {port} within "
                                     f"{start_timeout:g} s (log: {log_file})")
            await trio.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        with trio.CancelScope(shield=True):
            _kill_group(proc, signal.SIGTERM)
            with trio.move_on_after(STOP_GRACE_S):
                await proc.wait()
            _kill_group(proc, signal.SIGKILL)  # stragglers (workerd) even if the top exited
            with trio.move_on_after(2.0):
                await proc.wait()


def run_bridge_dev(bridge_dir: str | Path | None = None, port: int | None = None,
                   key_hex: str | None = None, persist_dir: str | Path | None = None,
                   extra_vars: dict[str, str] | None = None) -> int:
    """Blocking: run the bridge until Ctrl-C or SIGTERM. For ``teammesh bridge dev``.
    ``extra_vars`` default to :data:`DEV_VARS` (relaxed rate limits for local use)."""
    extra_vars = dict(DEV_VARS) if extra_vars is None else extra_vars
    bridge_dir = Path(bridge_dir) if bridge_dir else default_bridge_dir()
    persist_dir = Path(persist_dir) if persist_dir else bridge_dir / ".wrangler" / "teammesh-dev"
    if key_hex is None:
        from teammesh.node.bridge.client import new_bridge_key

        key_hex = new_bridge_key().hex()
        print(f"no bridge key given; using a fresh one for this run: {key_hex}", flush=True)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with open_bridge_dev(bridge_dir, port, key_hex, persist_dir,
                                       extra_vars=extra_vars) as url:
                relaxed = ", ".join(f"{k}={v}" for k, v in extra_vars.items())
                print(f"bridge running at {url} (state in {persist_dir}"
                      f"{'; ' + relaxed if relaxed else ''}); Ctrl-C stops it", flush=True)
                async for _ in signals:
                    break
        print("bridge stopped", flush=True)

    try:
        trio.run(main)
    except BridgeDevError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover - manual use
    t0 = time.monotonic()
    sys.exit(run_bridge_dev(port=int(sys.argv[1]) if len(sys.argv) > 1 else None))
