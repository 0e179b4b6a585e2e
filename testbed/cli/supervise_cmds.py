"""The cluster's components as people and scenarios see them: status, stop, start, restart."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import click

from testbed import naming
from testbed.cli.common import Target, fail, pass_target
from testbed.cluster.processes import ProcessTable, Recorded
from testbed.cluster.supervisor import COMPONENTS, last_known_status


def _ask(target: Target, request: dict[str, Any]) -> dict[str, Any]:
    from testbed.cluster.supervisor import ask

    try:
        answer = ask(target.state.path, request)
    except OSError as exc:
        fail(f'cluster "{target.name}" has no running supervisor ({exc}); is it up? (`svclab status`)')
    if not answer.get("ok"):
        fail(answer.get("error", "the supervisor refused the request"))
    return answer


def _control(verb: str):
    @click.command(name=verb)
    @click.argument("component", type=click.Choice(COMPONENTS), metavar="COMPONENT")
    @click.option("--node", default=None, help="Only this node's kubelet or kube-proxy (default: every node's).")
    @pass_target
    def command(target: Target, component: str, node: str | None) -> None:
        for item in _ask(target, {"verb": verb, "component": component, "node": node})["components"]:
            click.echo(f"{item['name']}: {item['state']}" + (f" (pid {item['pid']})" if item["pid"] else ""))

    command.help = {
        "stop": "Stop COMPONENT and keep it down until `svclab start` (a killed one comes back by itself).",
        "start": "Start a stopped COMPONENT again.",
        "restart": "Stop COMPONENT (SIGTERM, then SIGKILL after 10 s) and start it again.",
    }[verb]
    return command


stop, start, restart = _control("stop"), _control("start"), _control("restart")


def _components(target: Target) -> tuple[list[dict[str, Any]], str]:
    """The supervisor's view, or (when it is gone) what processes.json and supervisor.json say."""
    from testbed.cluster.supervisor import ask

    try:
        answer = ask(target.state.path, {"verb": "status"}, timeout=10)
        return answer["components"], "running"
    except (OSError, ValueError, KeyError):
        pass
    out = last_known_status(target.state.path, ProcessTable(target.state.path))
    return out, "not running (states read from the process table)"


def _apiserver_health(target: Target) -> dict[str, Any]:
    from testbed.api.errors import ApiError
    from testbed.client.client import ApiClient

    async def probe() -> dict[str, Any]:
        async with ApiClient.for_state_dir(target.state) as client:
            _, revision = await client.list("Node")
            return {"healthy": True, "revision": revision}

    if not target.state.api_socket.exists():
        return {"healthy": False, "error": "no API socket"}
    try:
        return asyncio.run(asyncio.wait_for(probe(), 5))
    except (ApiError, asyncio.TimeoutError, OSError) as exc:
        return {"healthy": False, "error": str(exc) or type(exc).__name__}


def _proxy_sync(target: Target, recorded: Recorded | None, node: str) -> dict[str, Any] | None:
    """What the node's kube-proxy says of its last sync (its /healthz, asked inside the node)."""
    from testbed.node.podnet import entered_netns

    address = recorded.flag("--metrics-address") if recorded is not None else None
    if address is None:
        return None
    try:
        with entered_netns(naming.node_netns(target.name, node)):
            with urllib.request.urlopen(f"http://{address}/healthz", timeout=2) as answer:
                body = json.load(answer)
    except urllib.error.HTTPError as exc:  # 503: a requested sync is overdue
        body = json.load(exc)
        body["overdue"] = True
    except (OSError, ValueError) as exc:
        return {"ok": False, "answered": False, "error": f"no answer ({exc})"}
    error = body.get("lastSyncError", "")
    return {"ok": not error and not body.get("overdue"), "lastUpdated": body.get("lastUpdated", ""),
            "error": error or ("a requested sync is overdue" if body.get("overdue") else "")}


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"


def _state(item: dict[str, Any]) -> str:
    if item["state"] == "RESTARTING" and item.get("nextStartIn") is not None:
        return f"RESTARTING in {item['nextStartIn']}s"
    return item["state"]


def _sync_text(sync: dict[str, Any] | None) -> str:
    if sync is None:
        return ""
    if sync["ok"]:
        return f"ok at {sync['lastUpdated']}"
    return "no answer yet" if sync.get("answered") is False else f"FAILED: {sync['error'][:60]}"


@click.command()
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_target
def status(target: Target, output: str) -> None:
    """Every component of the cluster per node, the API server's health, each kube-proxy's last sync."""
    if not target.state.path.exists():
        fail(f'no cluster "{target.name}" (nothing in {target.state.path})')
    components, supervisor = _components(target)
    table = ProcessTable(target.state.path).load()
    for item in components:
        if item["component"] == "kube-proxy" and item["state"] == "RUNNING":
            item["sync"] = _proxy_sync(target, table.get(item["name"]), item["node"])
    report = {"cluster": target.name, "supervisor": supervisor, "apiserver": _apiserver_health(target),
              "components": components}
    if output == "json":
        click.echo(json.dumps(report, indent=2))
        return
    api = report["apiserver"]
    click.echo(f"Cluster {target.name}: API server "
               + (f"healthy (revision {api['revision']})" if api["healthy"] else f"UNHEALTHY ({api['error']})")
               + f"; supervisor {supervisor}")
    rows = [("NODE", "COMPONENT", "STATE", "PID", "RESTARTS", "UPTIME", "LAST EXIT", "LAST SYNC")]
    for item in sorted(components, key=lambda c: (c["node"] or "", c["component"])):
        rows.append((item["node"] or "-", item["component"], _state(item), str(item["pid"] or "-"),
                     str(item["restarts"]), _uptime(item["uptime"]), item["lastExit"] or "-",
                     _sync_text(item.get("sync"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())

