"""Load only the parts of py-libp2p a teammesh node runs.

`import libp2p` executes the package's ``__init__``, which imports every transport,
security protocol and service the library ships — QUIC (aioquic), TLS and AutoTLS (an
ACME client), circuit relay, WebSocket, mDNS (zeroconf), and dnspython's DNS-over-QUIC —
whether or not a host uses them. That was about half of a daemon's start-up time
(docs/BENCHMARKS.md, "Footprint"). A node uses TCP, Noise, yamux, identify and gossipsub
only, and the modules import one another in a cycle, so they cannot be loaded one by one.

`install()` therefore answers imports of the unused subsystems with placeholder modules:
any name taken from one is an inert exception class that refuses to be called, so
``from libp2p.transport.quic.transport import QUICTransport`` still succeeds and
``isinstance(conn, QUICConnection)`` is simply False — which is true for every connection
a node makes. dnspython's DNS-over-QUIC is switched off through dnspython's own switch.
A py-libp2p release other than the one this was checked against (`CHECKED_VERSION`) gets
the full import, and so does ``TEAMMESH_FULL_IMPORTS=1``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CHECKED_VERSION = "0.8.1"

# py-libp2p subsystems a node never starts (it passes TCP, Noise and yamux explicitly).
STUBBED: tuple[str, ...] = (
    "libp2p.transport.quic",
    "libp2p.transport.websocket",
    "libp2p.security.tls",
    "libp2p.relay",
    "libp2p.discovery.mdns",
)


class _Unused(Exception):
    """What a name from a stubbed module is: a class usable in an ``except`` clause or an
    isinstance check (the library catches QUIC errors next to yamux ones), which never
    matches. Calling it means a skipped subsystem is in use after all: fail loudly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"{type(self).__module__}.{type(self).__name__} belongs to a py-libp2p part "
            "teammesh does not load; set TEAMMESH_FULL_IMPORTS=1 to load all of py-libp2p")


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (_Unused,), {"__module__": self.__name__})
        setattr(self, name, cls)
        return cls


def _matches(fullname: str, prefixes: tuple[str, ...]) -> bool:
    return any(fullname == p or fullname.startswith(p + ".") for p in prefixes)


class _LeanFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "dns.quic":
            _no_dns_over_quic()
            return None
        if _matches(fullname, STUBBED):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _no_dns_over_quic() -> None:
    # dnspython imports aioquic for DNS-over-QUIC when aioquic is installed (py-libp2p
    # installs it); /dns multiaddrs resolve over plain DNS. Done when dns.quic is first
    # imported: importing dnspython any earlier would slow every process that imports
    # teammesh.node, worker processes included.
    try:
        import dns._features

        dns._features.force("doq", False)
    except ImportError:
        pass


def _checked_release() -> bool:
    """Whether the installed py-libp2p is the release this was checked against, without
    importlib.metadata (itself a noticeable import for a worker process)."""
    spec = importlib.util.find_spec("libp2p")
    if spec is None or not spec.submodule_search_locations:
        return False
    site = Path(next(iter(spec.submodule_search_locations))).parent
    return (site / f"libp2p-{CHECKED_VERSION}.dist-info").is_dir()


_installed = False


def install() -> bool:
    """Install the lean import hook if libp2p is not loaded yet; return whether it is on.

    Once libp2p is imported the hook could only make the library half stubbed, so a
    process that imported it first (a test, a script) keeps the full library."""
    global _installed
    if _installed:
        return True
    if os.environ.get("TEAMMESH_FULL_IMPORTS") == "1" or "libp2p" in sys.modules:
        return False
    if not _checked_release():
        return False
    sys.meta_path.insert(0, _LeanFinder())
    _installed = True
    return True
