"""Public import path for the Python client: ``from teammesh.client import Client``."""

from __future__ import annotations

from teammesh.node.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]
