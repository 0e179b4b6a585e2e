"""`svclab fault ACTION ...`: the fault injection library (testbed/faults/) by hand.

One thin command per action; each prints what it did (`f3: partition client | node2 (both,
drop)`, the id is what `heal` and `list` show). A bad argument is refused naming the field,
and nothing changes. docs/faults.md describes every action.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import click

from testbed import faults
from testbed.cli.common import SvclabGroup, Target, fail, pass_target
from testbed.faults.state import Fault


def _run(target: Target, action: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    cluster = faults.FaultTarget(target.name, target.state)
    try:
        return action(cluster, *args, **kwargs)
    except faults.FaultError as exc:
        fail(f"invalid fault: {exc}")
    except (RuntimeError, OSError) as exc:
        fail(str(exc))


def _show(result: Fault | list[Fault]) -> None:
    """A Fault is what an action did; a list is what an undo (heal, link-up, ...) undid."""
    undone = isinstance(result, list)
    for fault in result if undone else [result]:
        click.echo(f"{'undone ' if undone else ''}{fault.id + ': ' if fault.id else ''}{fault.summary}")


@click.group(name="fault", cls=SvclabGroup)
def fault() -> None:
    """Inject faults into a running cluster (svclab fault ACTION --help); heal with `svclab fault heal`."""


@fault.command(name="list")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_target
def list_cmd(target: Target, output: str) -> None:
    """The faults in force, oldest first."""
    active = _run(target, faults.list_faults)
    if output == "json":
        click.echo(json.dumps([f.to_json() for f in active], indent=2))
    elif not active:
        click.echo("no active faults")
    for fault in active if output == "table" else []:
        click.echo(f"{fault.id}: {fault.summary}")


@fault.command()
@click.argument("ids", nargs=-1)
@pass_target
def heal(target: Target, ids: tuple[str, ...]) -> None:
    """Undo the network faults (partition, loss, bandwidth, delay, link-down/flap, dns-error): all, or IDS."""
    healed = _run(target, faults.heal, list(ids) or None)
    _show(healed) if healed else click.echo("nothing to heal")
    for item in _run(target, faults.list_faults):
        click.echo(f"still in force: {item.id}: {item.summary}")


@fault.command()
@click.argument("groups", nargs=-1, required=True)
@click.option("--direction", type=click.Choice(["both", "one-way"]), default="both", show_default=True,
              help="one-way: the first group cannot open connections to (or send to) the second; replies flow.")
@click.option("--mode", type=click.Choice(["drop", "reject"]), default="drop", show_default=True,
              help="reject: TCP RST / ICMP host unreachable instead of silence.")
@pass_target
def partition(target: Target, groups: tuple[str, ...], direction: str, mode: str) -> None:
    """Cut GROUPS of hosts apart, each a comma-separated list: svclab fault partition client node2,node3."""
    _show(_run(target, faults.partition, [g.split(",") for g in groups], direction, mode))


def _value_command(name: str, action: Callable[..., Any], value: str, kind: Any, help_text: str) -> click.Command:
    """`svclab fault NAME TARGET VALUE` (loss, bandwidth)."""
    @click.command(name=name, help=help_text)
    @click.argument("target_host", metavar="TARGET")
    @click.argument("value", metavar=value, type=kind)
    @pass_target
    def command(target: Target, target_host: str, value: Any) -> None:
        _show(_run(target, action, target_host, value))

    return command


fault.add_command(_value_command("loss", faults.loss, "PERCENT", float,
                                 "Lose PERCENT % of the packets each way on TARGET's links (node1.., client, gw)."))
fault.add_command(_value_command("bandwidth", faults.bandwidth, "RATE", str,
                                 "Limit TARGET's links to RATE each way (tc units: 1mbit, 500kbit, 2mbps)."))


@fault.command()
@click.argument("target_host", metavar="TARGET")
@click.argument("delay")
@click.option("--jitter", default="0ms", show_default=True)
@pass_target
def delay(target: Target, target_host: str, delay: str, jitter: str) -> None:
    """Delay what TARGET sends by DELAY (netem; needs a kernel with sch_netem)."""
    _show(_run(target, faults.delay, target_host, delay, jitter))


def _one_target_command(name: str, action: Callable[..., Any], metavar: str, help_text: str) -> click.Command:
    """`svclab fault NAME TARGET|NODE` (links, nodes, flushes)."""
    @click.command(name=name, help=help_text)
    @click.argument("host", metavar=metavar)
    @pass_target
    def command(target: Target, host: str) -> None:
        result = _run(target, action, host)
        _show(result) if result else click.echo("nothing to undo")

    return command


for _command in (
    _one_target_command("link-down", faults.link_down, "TARGET", "Take TARGET's links down (inside its namespace) until link-up or heal."),
    _one_target_command("link-up", faults.link_up, "TARGET", "Bring TARGET's links and their routes back."),
    _one_target_command("node-crash", faults.node_crash, "NODE",
                  "Crash NODE: kubelet and kube-proxy SIGKILLed and kept down, pod processes killed, links down."),
    _one_target_command("node-recover", faults.node_recover, "NODE", "Links of NODE up, its kubelet and kube-proxy started again."),
    _one_target_command("node-freeze", faults.node_freeze, "NODE", "SIGSTOP NODE's kubelet, kube-proxy and pod processes."),
    _one_target_command("node-thaw", faults.node_thaw, "NODE", "SIGCONT what node-freeze stopped."),
    _one_target_command("flush-rules", faults.flush_rules, "NODE",
                  "Flush NODE's kube-proxy rules (iptables -t nat -F / nft flush table ip kube-proxy)."),
    _one_target_command("flush-conntrack", faults.flush_conntrack, "NODE", "Empty NODE's conntrack table (conntrack -F)."),
):
    fault.add_command(_command)


@fault.command(name="link-flap")
@click.argument("target_host", metavar="TARGET")
@click.option("--count", type=int, default=3, show_default=True)
@click.option("--interval", default="1s", show_default=True, help="How long the links stay down, then up.")
@pass_target
def link_flap(target: Target, target_host: str, count: int, interval: str) -> None:
    """Take TARGET's links down and up COUNT times; returns when done."""
    _show(_run(target, faults.link_flap, target_host, count, interval, wait=True))


def _component_command(name: str, action: Callable[..., Any], help_text: str) -> click.Command:
    @click.command(name=name, help=help_text)
    @click.argument("component", metavar="COMPONENT")
    @click.option("--node", default=None, help="Only this node's kubelet, kube-proxy or coredns pods.")
    @pass_target
    def command(target: Target, component: str, node: str | None) -> None:
        result = _run(target, action, component, node)
        _show(result) if result else click.echo("nothing was stopped")

    return command


_COMPONENTS = ", ".join(faults.ALL_COMPONENTS)
for _command in (
    _component_command("component-kill", faults.component_kill,
                       f"SIGKILL COMPONENT ({_COMPONENTS}); supervision brings it back."),
    _component_command("component-stop", faults.component_stop, "Stop COMPONENT until component-start."),
    _component_command("component-start", faults.component_start, "Start what component-stop stopped."),
):
    fault.add_command(_command)


@fault.command(name="pod-kill")
@click.argument("pod")
@click.option("-n", "--namespace", default="default", show_default=True)
@pass_target
def pod_kill(target: Target, pod: str, namespace: str) -> None:
    """Kill POD's containers; its kubelet restarts them as restartPolicy says (restartCount counts)."""
    _show(_run(target, faults.pod_kill, pod, namespace))


@fault.command(name="dns-error")
@click.argument("names")
@click.option("--rcode", default="SERVFAIL", show_default=True, help="SERVFAIL or NXDOMAIN.")
@pass_target
def dns_error(target: Target, names: str, rcode: str) -> None:
    """Cluster DNS answers RCODE for names matching the glob NAMES (e.g. 'frontend-*') until heal."""
    _show(_run(target, faults.dns_error, names, rcode))
