"""The team mesh over py-libp2p: the host, membership (roster, certificates, gates) and the
capability gossip.

This room is the only one that imports py-libp2p, so it installs the lean import hook
(core/lean_imports.py) before py-libp2p loads: a process that runs a node gets it, and a
process that only uses ``teammesh.client`` never imports this room.
"""

from teammesh.node.core.lean_imports import install as _install_lean_imports

_install_lean_imports()
