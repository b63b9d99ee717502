"""The chat server: a FastAPI app over a pool of model replicas (`nanochat serve`).

    settings.py     Limits and ServerSettings
    pool.py         Replica and ReplicaPool: model copies, each with its own thread
    generation.py   RowDecoder and Generation: tokens to text pieces, on a replica's thread
    protocol.py     request bodies, validation, error bodies, prompt building (both APIs)
    app.py          create_app (routes, chat page, middleware) and BackgroundServer
    ui.html         the chat web UI, one self-contained page
"""
from __future__ import annotations

import importlib

from nanochat.server.generation import Generation, RowDecoder
from nanochat.server.pool import Replica, ReplicaPool
from nanochat.server.settings import Limits, ServerSettings

# These need the `serve` extra (fastapi, pydantic), so they are imported on first use:
# the names above work without it.
_NEEDS_SERVE_EXTRA = {
    "create_app": "app",
    "BackgroundServer": "app",
    "ApiError": "protocol",
    "parts_from_marked_text": "protocol",
}

__all__ = ["Generation", "Limits", "Replica", "ReplicaPool", "RowDecoder", "ServerSettings",
           *_NEEDS_SERVE_EXTRA]


def __getattr__(name: str):
    module = _NEEDS_SERVE_EXTRA.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
