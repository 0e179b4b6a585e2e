"""The table feed: a Unix socket in the state directory, JSON lines, a full snapshot on connect and on change."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from testbed.cloud.lb_table import Table

log = logging.getLogger("svclab.cloud")


class TableFeed:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._line = Table().dumps().encode() + b"\n"
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # a previous instance's (kill -9)
        self._server = await asyncio.start_unix_server(self._connected, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self.path.unlink(missing_ok=True)

    def publish(self, table: Table) -> None:
        line = table.dumps().encode() + b"\n"
        if line == self._line:
            return
        self._line = line
        for writer in list(self._writers):
            writer.write(line)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        log.info("load balancer app connected")
        self._writers.add(writer)
        writer.write(self._line)
        try:
            await reader.read()  # until it goes away
        except ConnectionError:  # gone while a snapshot was being written to it
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
