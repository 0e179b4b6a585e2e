"""API calls of fault actions (pods, the DNS config), from synchronous code.

Fault actions are plain functions: the CLI calls them, and so does a scenario runner, maybe
from inside its own event loop, where asyncio.run() is refused; then the call runs on a
thread of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Awaitable, Callable, TypeVar

from testbed.api.errors import Conflict
from testbed.client.client import ApiClient
from testbed.faults.target import FaultError, FaultTarget

T = TypeVar("T")
CONFLICT_RETRIES = 10


def call(target: FaultTarget, fn: Callable[[ApiClient], Awaitable[T]]) -> T:
    if not target.state.api_socket.exists():
        raise FaultError("cluster", f'cluster "{target.cluster}" has no API server socket ({target.state.api_socket})')

    async def main() -> T:
        async with ApiClient.for_state_dir(target.state) as client:
            return await fn(client)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


async def update_retrying(client: ApiClient, kind: str, name: str, namespace: str, change: Callable) -> None:
    """Get, change(obj), update; again on a conflict (someone else wrote it meanwhile)."""
    for _ in range(CONFLICT_RETRIES):
        obj = await client.get(kind, name, namespace)
        change(obj)
        try:
            await client.update(obj)
            return
        except Conflict:
            continue
    raise RuntimeError(f"{kind} {namespace}/{name}: still conflicting after {CONFLICT_RETRIES} tries")
