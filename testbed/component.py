"""How every svclab component process runs: connect, work until SIGTERM/SIGINT, clean up.

A component's work that fails takes the process down loudly (after cleanup),
so a half-working component never goes unnoticed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable

from testbed.client.client import ApiClient

Work = Callable[[ApiClient], Awaitable[None]]
Cleanup = Callable[[], Awaitable[None]]


async def _run(address: str, token: str, work: Work, cleanup: Cleanup | None) -> None:
    client = ApiClient(address, token)
    await client.wait_ready(timeout=30)
    task = asyncio.create_task(work(client))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        if cleanup is not None:
            await cleanup()
        await client.close()
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()


def run_component(address: str, token: str, work: Work, cleanup: Cleanup | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_run(address, token, work, cleanup))
