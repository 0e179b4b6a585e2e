"""Cluster lifecycle verbs (up, demo, down, clean) and looking inside nodes (exec, rules)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import click

from testbed import naming
from testbed.api.errors import plain
from testbed.cli.common import Duration, Target, fail, pass_target, run_with_client
from testbed.cli.printers import service_external_ip
from testbed.cluster import procfs
from testbed.cluster.config import ClusterConfig, ConfigError
from testbed.node import cgroups
from testbed.proxy.backends import MODES


@click.command()
@click.option("--nodes", type=int, default=None, help="Number of nodes (default 3).")
@click.option("--proxy-mode", type=click.Choice(MODES), default=None, help="kube-proxy mode (default iptables).")
@click.option("-f", "--filename", "files", multiple=True, help="Manifests to apply once the cluster is up.")
@click.option("--config", "config_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Cluster config YAML (nodes, subnets, proxy mode, ...).")
@click.option("--detach", is_flag=True, help="Return once the cluster serves; stop it with `svclab down`.")
@click.option("--timeout", type=Duration(), default="120s", show_default=True)
@click.pass_context
def up(ctx: click.Context, nodes: int | None, proxy_mode: str | None, files: tuple[str, ...],
       config_file: Path | None, detach: bool, timeout: float) -> None:
    """Build a cluster: Mininet nodes, API server, controllers, kubelets; then apply -f manifests."""
    target: Target = ctx.obj
    try:
        config = ClusterConfig.from_file(config_file) if config_file else ClusterConfig()
        config = config.with_overrides(nodes=nodes, proxy_mode=proxy_mode,
                                       name=target.name if target.named or not config_file else None)
    except ConfigError as exc:
        fail(f"invalid cluster config: {exc}")
    if config.proxy_mode == "ipvs":  # before root: the way out repeats this very command in the VM
        from testbed.proxy import backends
        try:
            backends.check_mode("ipvs", sys.argv[1:])
        except backends.Unsupported as exc:
            fail(str(exc))
    if os.geteuid() != 0:
        fail("svclab up needs root (network namespaces, Open vSwitch)")
    if config.name != target.name:
        from testbed.cli.common import make_target
        target = make_target(config.name, None, target.state.path.parent)
    from testbed.cluster.lifecycle import is_running
    if is_running(target.state):  # before anything is touched: its log, its state
        fail(f'cluster "{config.name}" is already running (svclab down --name {config.name})')
    from testbed.manifests import ManifestInvalid, load_paths
    try:
        manifests = load_paths(list(files)).objects if files else []
    except ManifestInvalid as exc:
        fail(str(exc))
    if detach:
        argv = ["up", *(["--nodes", str(nodes)] if nodes else []), *(["--proxy-mode", proxy_mode] if proxy_mode else []),
                *(["--config", str(config_file.resolve())] if config_file else []), "--timeout", str(timeout)]
        for f in files:
            argv += ["-f", f if f == "-" else str(Path(f).resolve())]
        _up_detached(target, argv)
        return
    _up_foreground(config, target, manifests, timeout, interactive=sys.stdin.isatty())


def _up_foreground(config: ClusterConfig, target: Target, manifests, timeout: float, interactive: bool) -> None:
    from testbed.cluster.lifecycle import Cluster, ClusterError

    cluster = Cluster(config, target.state, progress=lambda line: click.echo(line, err=True))
    click.echo(f"Creating cluster \"{config.name}\" ...", err=True)
    try:
        summary = cluster.start(manifests, timeout=timeout)
    except ClusterError as exc:
        fail(str(exc))
    click.echo(_summary_text(config, summary))
    ready_file = os.environ.get("SVCLAB_READY_FILE")
    hold(cluster, interactive, on_hold=(lambda: Path(ready_file).touch()) if ready_file else None)


def hold(cluster, interactive: bool, on_hold=None) -> None:
    """Keep a started cluster up until `svclab down` (SIGTERM), Ctrl-C or, in a terminal, the
    exit of its shell; then stop it. This process becomes the cluster's `up`, which down signals."""
    stop = {"now": False}

    def request_stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, request_stop)
    cluster.processes.record("up", os.getpid())  # what `svclab down` signals
    try:
        if on_hold is not None:  # a detached `svclab up` waits for its ready file
            on_hold()
        if interactive:
            from testbed.cluster.shell import ClusterShell
            ClusterShell(cluster).run()
        else:
            while not stop["now"]:
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the teardown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        click.echo(f"Deleting cluster \"{cluster.config.name}\" ...", err=True)
        cluster.stop()


def _up_detached(target: Target, up_argv: list[str]) -> None:
    """Run `svclab up` (in the foreground, non-interactive) in its own session; return once it serves."""
    import subprocess

    argv = ["--name", target.name, "--state-root", str(target.state.path.parent), *up_argv]
    target.state.path.parent.mkdir(parents=True, exist_ok=True)
    log_path, ready = target.state.up_log, target.state.ready_file
    ready.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "testbed", *argv], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "SVCLAB_READY_FILE": str(ready)})
    shown = 0
    while not ready.exists():
        text = log_path.read_text(errors="replace")
        sys.stderr.write(text[shown:])
        shown = len(text)
        if proc.poll() is not None:
            fail(f"svclab up failed (exit {proc.returncode}); full log: {log_path}")
        time.sleep(0.1)
    text = log_path.read_text(errors="replace")
    sys.stderr.write(text[shown:])
    ready.unlink(missing_ok=True)


def _summary_text(config: ClusterConfig, summary) -> str:
    lines = ["", f"Cluster \"{config.name}\": {len(summary.nodes)} nodes, client {summary.client_ip}"]
    lines += [f"  {node:<8} {ip}" for node, ip in summary.nodes.items()]
    first_node = next(iter(summary.nodes.values()))
    for svc in summary.services:
        if svc.metadata.namespace == "kube-system" or svc.metadata.name == "kubernetes":
            continue
        ports = ",".join(f"{p.port}" for p in svc.spec.ports)
        lines.append(f"  service {svc.metadata.name}: {svc.spec.type} {svc.spec.cluster_ip}:{ports}"
                     f" external {service_external_ip(svc)}")
        for p in svc.spec.ports:
            if p.node_port:
                lines.append(f"    from outside: svclab exec client -- curl -s http://{first_node}:{p.node_port}")
    flag = "" if config.name == "svclab" else f" --name {config.name}"
    lines += ["", f"  svclab{flag} get pods -o wide", f"  svclab{flag} exec node1 -- ip route",
              f"  svclab{flag} down"]
    return "\n".join(lines)


SEED = Path(__file__).resolve().parents[2] / "scenarios" / "manifests" / "seed"


@click.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """The seed article's cluster: 3 nodes, the frontend Deployment and its NodePort Service.

    In a terminal it opens the cluster's shell (exit tears the cluster down);
    otherwise it starts the cluster in the background (`svclab down` stops it).
    """
    from testbed.cluster.lifecycle import is_running

    target: Target = ctx.obj
    if is_running(target.state):
        click.echo(f'cluster "{target.name}" is already running: svclab --name {target.name} get svc,'
                   f" or svclab --name {target.name} down")
        return
    files = (str(SEED / "frontend-deployment.yaml"), str(SEED / "service-nodeport.yaml"))
    ctx.invoke(up, files=files, detach=not sys.stdin.isatty())


@click.command()
@pass_target
def down(target: Target) -> None:
    """Tear the cluster down (every namespace, interface, bridge, process and file of it)."""
    from testbed.cluster.processes import ProcessTable

    supervisor = ProcessTable(target.state.path).load().get("up")
    if supervisor is not None and supervisor.alive():
        os.kill(supervisor.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while supervisor.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    removed = _clean(target) + _remove_up_files(target)
    click.echo(f"cluster \"{target.name}\" deleted" if removed or supervisor else f"no cluster \"{target.name}\"")


def _clean(target: Target) -> list[str]:
    from testbed.cluster.lifecycle import ClusterError, clean

    try:
        return clean(target.name, target.state)
    except ClusterError as exc:
        fail(str(exc))


def _remove_up_files(target: Target) -> list[str]:
    """A detached `svclab up`'s log and ready file (kept by a failed start, for the user to read)."""
    removed = []
    for path in (target.state.up_log, target.state.ready_file):
        if path.exists():
            path.unlink()
            removed.append(f"file {path}")
    return removed


@click.command(name="clean")
@pass_target
def clean_cmd(target: Target) -> None:
    """Remove what a cluster whose processes died left behind (namespaces, bridges, processes, files)."""
    from testbed.cluster.lifecycle import is_running

    if is_running(target.state):
        fail(f"cluster \"{target.name}\" is running; use `svclab down --name {target.name}`")
    removed = _clean(target) + _remove_up_files(target)
    for item in removed:
        click.echo(f"removed {item}")
    if not removed:
        click.echo(f"nothing left of cluster \"{target.name}\"")


@click.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.option("-n", "--namespace", default="", help="The pod's namespace (default: default).")
@click.argument("target_name", metavar="TARGET")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_target
def exec_cmd(target: Target, namespace: str, target_name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in a pod's, node's or the client's namespace: svclab exec client -- curl ..."""
    _check_target_name(target_name)
    netns = naming.node_netns(target.name, target_name)
    if not Path(naming.netns_path(netns)).exists():
        async def find(client):
            return await client.get("Pod", target_name, namespace)
        pod = run_with_client(target, find)
        netns = naming.pod_netns(target.name, pod.metadata.uid)
        if not Path(naming.netns_path(netns)).exists():
            fail(f'pod "{target_name}" has no network namespace yet (phase {pod.status.phase or "Pending"})')
    argv = list(command[1:] if command and command[0] == "--" else command)
    os.execvp(*_exec_argv(netns, argv))


def _exec_argv(netns: str, argv: list[str]) -> tuple[str, list[str]]:
    """Into a `command:` pod's sandbox (its namespaces and cgroup, as `kubectl exec` enters the
    container), else into the namespace of a node, the client or a pod without a command."""
    inode = procfs.ns_inode(naming.netns_path(netns))
    init = procfs.sandbox_init(inode) if inode is not None else None
    if init is None:
        return "ip", ["ip", "netns", "exec", netns, *argv]
    cgroups.join_cgroups_of(init)
    return "nsenter", ["nsenter", f"--target={init}", "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup",
                       "--", *argv]


def _check_target_name(name: str) -> None:
    """Refuse a node or pod name that would make a netns path outside the cluster's (../other-node),
    worded as client-go refuses such a resource name."""
    problems = naming.path_segment_problems(name)
    if problems:
        fail(f'invalid resource name "{plain(name)}": [{" ".join(problems)}]')


@click.command()
@click.argument("node")
@pass_target
def rules(target: Target, node: str) -> None:
    """Print what NODE's kube-proxy programmed (its backend's dump), Services annotated."""
    from testbed.cluster.proxy_readback import NodeProxy
    from testbed.proxy import backends
    from testbed.proxy.annotate import annotate
    from testbed.proxy.kernel import RulesFailed

    _check_target_name(node)
    proxy = NodeProxy(target.name, target.state.path, node)
    if not proxy.exists():
        fail(f'no node "{node}" in cluster "{target.name}"')
    mode = proxy.mode()
    try:
        text = proxy.rules()
    except backends.Unsupported as exc:
        fail(str(exc))
    except RulesFailed as exc:
        fail(f"reading {node}'s {mode} rules failed: {exc}")

    async def services(client):
        return (await client.list("Service"))[0]

    click.echo(annotate(mode, text, run_with_client(target, services)), nl=False)
