"""The kubelet's container-runtime socket: <state>/nodes/<node>/runtime.sock.

svclab's kubelet is its node's container runtime too (it hosts the built-in servers), so fault
injection asks it, as crictl asks containerd, to kill a pod's containers: one JSON request line
`{"verb": "kill", "namespace": ..., "name": ...}`, one JSON answer line
`{"ok": true, "containers": [...]}` or `{"ok": false, "error": ...}`. Root only (0600).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger("svclab.kubelet")

SOCKET = "runtime.sock"
MAX_REQUEST = 4096

Kill = Callable[[str, str], list[str]]


class RuntimeRequestError(RuntimeError):
    """A request the runtime refuses (no such pod, not running); nothing was changed."""


def answer(request: object, kill: Kill) -> dict:
    if not isinstance(request, dict) or request.get("verb") != "kill":
        return {"ok": False, "error": "unknown request: {\"verb\": \"kill\", \"namespace\": ..., \"name\": ...}"}
    namespace, name = request.get("namespace"), request.get("name")
    if not isinstance(namespace, str) or not isinstance(name, str) or not name:
        return {"ok": False, "error": "kill needs a pod namespace and name"}
    try:
        return {"ok": True, "containers": kill(namespace or "default", name)}
    except RuntimeRequestError as exc:
        return {"ok": False, "error": str(exc)}


async def serve(path: Path, kill: Kill) -> None:
    """Serve the socket until cancelled."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                reply = answer(json.loads(line[:MAX_REQUEST] or b"null"), kill)
            except ValueError:
                reply = {"ok": False, "error": "a request is one JSON object"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.TimeoutError) as exc:
            log.debug("runtime socket: %s", exc)
        finally:
            writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(handle, path=str(path))
    os.chmod(path, 0o600)
    try:
        await asyncio.Event().wait()
    finally:
        server.close()
        path.unlink(missing_ok=True)
