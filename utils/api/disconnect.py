"""Request work that stops when its client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from utils.errors import OpenAIError

T = TypeVar("T")


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it when the client goes away first. `work` runs in
    this task: handing it to a task of its own would make it wait for its turn on a
    busy event loop."""
    task = asyncio.current_task()
    assert task is not None
    watching, gone = True, False

    def on_disconnect(watcher: asyncio.Future[None]) -> None:
        nonlocal gone
        if watching and not watcher.cancelled() and watcher.exception() is None:
            gone = True
            task.cancel()

    watcher = asyncio.ensure_future(_wait_disconnect(request))
    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise OpenAIError(
                499, "The client closed the connection.", code="client_disconnected"
            ) from None
        raise
    finally:
        watching = False
        watcher.cancel()
