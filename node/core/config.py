"""Node home directory and configuration.

A home holds one node: its identity key (0600), config.toml, the SQLite journal, the API
token (0600) and, while the daemon runs, api.json telling the CLI where the daemon listens.
Config keys are validated at start; every error names the key, the bad value and the fix.
``TEAMMESH_<SECTION>_<KEY>`` environment variables override the file (values are read as
TOML literals when they parse, else as strings: ``TEAMMESH_NODE_SLOTS=4``).
"""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import tomli_w
from teammesh.protocols.errors import ConfigError
from teammesh.protocols.identity import Identity

ENV_PREFIX = "TEAMMESH_"


def default_home() -> Path:
    env = os.environ.get("TEAMMESH_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("teammesh", appauthor=False))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


@dataclass(frozen=True, slots=True)
class Home:
    path: Path

    @property
    def identity_file(self) -> Path:
        return self.path / "identity.key"

    @property
    def config_file(self) -> Path:
        return self.path / "config.toml"

    @property
    def token_file(self) -> Path:
        return self.path / "api.token"

    @property
    def api_file(self) -> Path:
        return self.path / "api.json"

    @property
    def journal_file(self) -> Path:
        return self.path / "journal.db"

    @property
    def root_key_file(self) -> Path:
        return self.path / "team-root.key"

    @property
    def log_file(self) -> Path:
        return self.path / "node.log"

    @property
    def initialized(self) -> bool:
        return self.identity_file.exists() and self.config_file.exists()

    def init(self) -> tuple[Identity, bool]:
        """Create identity, token and default config where missing; returns (id, created)."""
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        created = False
        if not self.identity_file.exists():
            _write_private(self.identity_file, secrets.token_bytes(32))
            created = True
        if not self.token_file.exists():
            _write_private(self.token_file, secrets.token_urlsafe(32).encode())
        if not self.config_file.exists():
            # 0600: the config may hold the bridge key and S3 credentials
            _write_private(self.config_file, DEFAULT_CONFIG_TOML.encode())
            created = True
        self.tighten()
        return self.identity(), created

    def tighten(self) -> None:
        """Make the home's secrets private to the user (homes made before 0600 was the
        rule, or files a user created with a loose umask)."""
        for path in (self.config_file, self.journal_file, self.token_file,
                     self.identity_file):
            for p in (path, path.with_name(path.name + "-wal"),
                      path.with_name(path.name + "-shm")):
                try:
                    if p.stat().st_mode & 0o077:
                        os.chmod(p, 0o600)
                except FileNotFoundError:
                    pass

    def require(self) -> None:
        if not self.initialized:
            raise ConfigError(f"{self.path} is not a teammesh home; run `teammesh init` first")

    def identity(self) -> Identity:
        self.require()
        seed = self.identity_file.read_bytes()
        if len(seed) != 32:
            raise ConfigError(
                f"{self.identity_file} is damaged (expected 32 bytes); restore it from a backup"
                " or delete the home and run `teammesh init` (the node gets a new peer id)"
            )
        mode = self.identity_file.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(self.identity_file, 0o600)
        return Identity(seed)

    def token(self) -> str:
        return self.token_file.read_text().strip()

    def write_private(self, path: Path, data: bytes) -> None:
        _write_private(path, data)


# --- the schema: section -> key -> (default, validator, hint) ------------------------------

Check = Callable[[Any], bool]


def _is_int(lo: int, hi: int | None = None) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo and (
        hi is None or v <= hi)


def _is_num(lo: float) -> Check:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= lo


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_provider_list(v: Any) -> bool:
    """files.providers: multiaddrs that name their peer (…/p2p/<peer id>)."""
    return _is_str_list(v) and all(
        x.startswith("/") and "/p2p/" in x and x.rpartition("/p2p/")[2].strip("/") != ""
        and "/" not in x.rpartition("/p2p/")[2] for x in v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_weights(v: Any) -> bool:
    return isinstance(v, dict) and set(v) <= {"compatibility", "latency", "cost", "health"} and all(
        isinstance(x, (int, float)) and x >= 0 for x in v.values())


def _is_kind_limits(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(n, int) and n >= 1 for k, n in v.items())


_CORES = os.cpu_count() or 1

SCHEMA: dict[str, dict[str, tuple[Any, Check, str]]] = {
    "node": {
        "name": ("", _is_str, "a display name"),
        "listen": (["/ip4/0.0.0.0/tcp/4117"], _is_str_list,
                   'a list of multiaddrs, e.g. ["/ip4/0.0.0.0/tcp/4117"]'),
        "bootstrap": ([], _is_str_list, "a list of full multiaddrs ending in /p2p/PEERID"),
        "api": ("127.0.0.1:0", _is_str, 'HOST:PORT on loopback, e.g. "127.0.0.1:7117"'),
        "slots": (_CORES, _is_int(0, 1024), "an integer from 0 to 1024"),
        "cost": (1.0, lambda v: _is_num(0)(v) and v <= 1e6,
                 "a number from 0 to 1000000 (relative price of this node's slots)"),
        "max_peers": (8, _is_int(1, 1000), "an integer from 1 to 1000"),
    },
    "gossip": {
        "ad_interval_s": (5.0, _is_num(0.2), "a number of seconds >= 0.2"),
        "ad_ttl_s": (15.0, _is_num(1), "a number of seconds >= 1, above ad_interval_s"),
    },
    "executor": {
        "allow": (["*"], _is_str_list, 'a list of kind names or globs, e.g. ["hash.*", "np.*"]'),
        "timeout_s": (300.0, _is_num(0.01), "a number of seconds > 0"),
        "memory_mb": (2048, _is_int(16), "an integer number of MiB >= 16"),
        "cpu_s": (600, _is_int(1), "an integer number of CPU seconds >= 1"),
        "max_input_mb": (1024, _is_int(1), "an integer number of MiB >= 1 (largest task input)"),
        "max_output_mb": (1024, _is_int(1),
                          "an integer number of MiB >= 1 (largest task output)"),
        "kind_max_input_mb": ({}, _is_kind_limits,
                              'a table of kind = MiB, e.g. {"csv.summary" = 4096}'),
        "kind_max_output_mb": ({}, _is_kind_limits,
                               'a table of kind = MiB, e.g. {"np.matmul" = 64}'),
        "member_queue": (0, _is_int(0),
                         "an integer >= 0: tasks one member may queue here (0 = a fair share)"),
        "member_queue_mb": (256, _is_int(1),
                            "an integer number of MiB >= 1: input bytes one member may queue"),
    },
    "journal": {
        "keep_days": (30.0, _is_num(0.001),
                      "a number of days > 0: finished tasks are forgotten after this"),
    },
    "scheduler": {
        "weights": ({"compatibility": 40, "latency": 30, "cost": 20, "health": 10}, _is_weights,
                    "a table with compatibility/latency/cost/health numbers >= 0"),
        "offer_window_s": (0.5, _is_num(0), "a number of seconds >= 0"),
        "max_attempts": (5, _is_int(1, 100), "an integer from 1 to 100"),
        "cache": (True, _is_bool, "true or false"),
        "cache_ttl_s": (7 * 86400.0, _is_num(1), "a number of seconds >= 1"),
        "kind_limits": ({}, _is_kind_limits,
                        'a table of kind = max running, e.g. {"np.matmul" = 2}'),
    },
    "bridge": {
        "url": ("", _is_str, 'the Worker URL, e.g. "https://teammesh.example.workers.dev"'),
        "key": ("", _is_str, "the team bridge key as hex (normally received when joining)"),
        "proxy": ("", _is_str, 'an HTTP(S) proxy URL, e.g. "http://proxy:3128"'),
    },
    "files": {
        "limit_mb": (10240, _is_int(0), "an integer number of MiB (0 = no limit)"),
        "max_file_mb": (65536, _is_int(0),
                        "an integer number of MiB: the largest file a DAG may claim"
                        " (0 = the default, 64 GiB)"),
        "fetch_order": (["local", "peers", "ipfs", "r2"], _is_str_list,
                        'a list drawn from "local", "peers", "ipfs", "r2"'),
        "serve": ("members", lambda v: v in ("members", "public"),
                  '"members" (default) or "public"'),
        "allow_peers": ([], _is_str_list, "a list of outside peer ids allowed to fetch blocks"),
        "providers": ([], _is_provider_list,
                      "a list of outside Bitswap peers to fetch from, each a multiaddr ending"
                      ' in /p2p/<peer id>, e.g. ["/ip4/192.0.2.7/tcp/4001/p2p/12D3KooW..."]'),
    },
    "ipfs": {
        "api": ("", _is_str, 'a Kubo RPC multiaddr, e.g. "/ip4/127.0.0.1/tcp/5001"'),
    },
    "r2": {
        "endpoint": ("", _is_str, 'the S3 endpoint, e.g. "https://ACCOUNT.r2.cloudflarestorage.com"'),
        "bucket": ("", _is_str, "the bucket name"),
        "access_key_id": ("", _is_str, "the S3 access key id"),
        "secret_access_key": ("", _is_str, "the S3 secret (prefer TEAMMESH_R2_SECRET_ACCESS_KEY)"),
        "region": ("auto", _is_str, '"auto" for R2'),
        "prefix": ("ipfs/", _is_str, "a key prefix"),
    },
}

DEFAULT_CONFIG_TOML = """\
# teammesh node configuration. Every key is optional; delete a line to get the default.
# Environment variables TEAMMESH_<SECTION>_<KEY> override these (TEAMMESH_NODE_SLOTS=4).

[node]
# listen = ["/ip4/0.0.0.0/tcp/4117"]   # where peers reach this node
# bootstrap = []                       # full multiaddrs of members to dial at start
# api = "127.0.0.1:0"                  # control API; port 0 picks a free one
# slots = <number of cores>            # tasks this node runs at once for the team (0 = none)

[executor]
# allow = ["*"]                        # kinds this node accepts, e.g. ["hash.*", "np.*"]
# timeout_s = 300
# memory_mb = 2048
# cpu_s = 600
"""


@dataclass(frozen=True, slots=True)
class Config:
    values: Mapping[str, Mapping[str, Any]]

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """Apply ``{"section.key": value}`` (from CLI flags), validated like the file."""
        merged = {s: dict(v) for s, v in self.values.items()}
        for dotted, value in overrides.items():
            section, key = dotted.split(".", 1)
            _check(section, key, value, "command line")
            merged[section][key] = value
        return Config(merged)


def _check(section: str, key: str, value: Any, source: str) -> None:
    if section not in SCHEMA:
        raise ConfigError(
            f"{source}: unknown section [{section}]; known sections: {', '.join(SCHEMA)}")
    if key not in SCHEMA[section]:
        raise ConfigError(
            f"{source}: unknown key {section}.{key}; known keys: {', '.join(SCHEMA[section])}")
    _, ok, hint = SCHEMA[section][key]
    if not ok(value):
        raise ConfigError(f"{source}: {section}.{key} = {value!r} is invalid; it must be {hint}")


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(home: Home, environ: Mapping[str, str] | None = None) -> Config:
    env = os.environ if environ is None else environ
    values: dict[str, dict[str, Any]] = {s: {k: v[0] for k, v in keys.items()}
                                         for s, keys in SCHEMA.items()}
    src = str(home.config_file)
    if home.config_file.exists():
        try:
            data = tomllib.loads(home.config_file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{src}: not valid TOML ({exc}); fix the file or delete it") from exc
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{src}: {section} must be a [section] table")
            for key, value in table.items():
                _check(section, key, value, src)
                values[section][key] = value
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or name == "TEAMMESH_HOME":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section not in SCHEMA:
            continue
        value = _env_value(text)
        _check(section, key, value, f"environment {name}")
        values[section][key] = value
    r2 = values["r2"]
    if r2["endpoint"] and not (r2["bucket"] and r2["access_key_id"] and r2["secret_access_key"]):
        raise ConfigError("r2.endpoint is set but r2.bucket, r2.access_key_id or"
                          " r2.secret_access_key is missing; set all four (or none)")
    if values["gossip"]["ad_ttl_s"] <= values["gossip"]["ad_interval_s"]:
        raise ConfigError("gossip.ad_ttl_s must be larger than gossip.ad_interval_s")
    return Config(values)


def dump_config(config: Config) -> str:
    return tomli_w.dumps({s: dict(v) for s, v in config.values.items()})
