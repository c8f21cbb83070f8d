"""Public import path for the Python client: ``from teammesh.client import Client``."""

from __future__ import annotations

from teammesh.node.client import (
    AsyncClient,
    AsyncTaskFuture,
    Client,
    ClientClosed,
    TaskCancelled,
    TaskFailed,
    TaskFuture,
    TeamExecutor,
)

__all__ = ["AsyncClient", "AsyncTaskFuture", "Client", "ClientClosed", "TaskCancelled",
           "TaskFailed", "TaskFuture", "TeamExecutor"]
