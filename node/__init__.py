"""The daemon: services, CLI, control API, scheduler, executor, journal."""

from .lean_imports import install as _install_lean_imports

# Before anything below imports py-libp2p: see lean_imports for what is skipped and why.
_install_lean_imports()
