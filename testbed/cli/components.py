"""The cluster's processes, each runnable alone like its Kubernetes counterpart."""

from __future__ import annotations

from pathlib import Path

import click

from testbed.cli.common import Duration, Target, pass_target
from testbed.proxy.backends import MODES


@click.command()
@click.option("--state-dir", "state_dir", type=click.Path(path_type=Path), required=True,
              help="Where the database, API socket (api.sock) and write token live.")
@click.option("--listen", default="", help="Also serve gRPC on this TCP address (host:port).")
@click.option("--service-cidr", default="10.96.0.0/12", show_default=True, help="ClusterIP range.")
@click.option("--node-port-range", default="30000-32767", show_default=True, help="NodePort range A-B.")
@click.option("--watch-history", default=100_000, show_default=True,
              help="Changes kept for watches to resume from.")
def apiserver(state_dir: Path, listen: str, service_cidr: str, node_port_range: str, watch_history: int) -> None:
    """Run the API server (gRPC; state in SQLite in --state-dir)."""
    from testbed.apiserver.allocators import ClusterIPAllocator, PortAllocator
    from testbed.apiserver.server import run

    try:
        ClusterIPAllocator(service_cidr)
        PortAllocator.parse(node_port_range)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    run(state_dir.resolve(), listen, service_cidr, node_port_range, watch_history)


def _api_options(fn):
    fn = click.option("--api", default=None, help="API server address (default: the cluster's socket).")(fn)
    fn = click.option("--token-file", type=click.Path(path_type=Path), default=None,
                      help="Bearer token for writes (default: the cluster's token file).")(fn)
    return fn


def api_endpoint(target: Target, api: str | None, token_file: Path | None) -> tuple[str, str]:
    token_path = token_file or target.state.token_file
    try:
        token = token_path.read_text().strip()
    except OSError as exc:
        raise click.BadParameter(f"cannot read the API token: {exc}", param_hint="--token-file") from None
    return api or target.state.api_address, token


@click.command(name="controller-manager")
@_api_options
@click.option("--cluster-cidr", default="10.244.0.0/16", show_default=True,
              help="Pod addresses; each node gets a /24 of it.")
@click.option("--node-monitor-grace-period", type=Duration(), default="5s", show_default=True,
              help="How long a node may miss heartbeats before it is NotReady.")
@pass_target
def controller_manager(target: Target, api: str | None, token_file: Path | None, cluster_cidr: str,
                       node_monitor_grace_period: float) -> None:
    """Run the controllers: deployments, scheduler, endpoint slices, node IPAM and lifecycle, GC."""
    from testbed.controllers.manager import run

    address, token = api_endpoint(target, api, token_file)
    run(address, token, cluster_cidr, node_monitor_grace_period)


@click.command()
@_api_options
@click.option("--node-name", required=True)
@click.option("--node-ip", required=True, help="This node's InternalIP.")
@click.option("--dns-ip", default="10.96.0.10", show_default=True, help="Nameserver written into pods' resolv.conf.")
@click.option("--heartbeat-interval", type=Duration(), default="1s", show_default=True)
@click.option("--max-pods", type=click.IntRange(min=1), default=110, show_default=True,
              help="Pods this node takes (at most the addresses of its pod CIDR): its pods capacity.")
@pass_target
def kubelet(target: Target, api: str | None, token_file: Path | None, node_name: str, node_ip: str, dns_ip: str,
            heartbeat_interval: float, max_pods: int) -> None:
    """Run a node's kubelet in the current network namespace (svclab up starts one per node)."""
    from testbed import naming
    from testbed.node.kubelet import KubeletConfig, run

    address, token = api_endpoint(target, api, token_file)
    run(address, token, KubeletConfig(
        cluster=target.name, node_name=node_name, node_ip=node_ip,
        node_netns=naming.node_netns(target.name, node_name), state_dir=target.state.path,
        dns_ip=dns_ip, heartbeat_interval=heartbeat_interval, max_pods=max_pods,
    ))


@click.command(name="kube-proxy")
@_api_options
@click.option("--node-name", required=True)
@click.option("--proxy-mode", type=click.Choice(MODES), default="iptables",
              show_default=True)
@click.option("--cluster-cidr", default="10.244.0.0/16", show_default=True,
              help="Pod addresses: traffic to ClusterIPs from outside it is masqueraded. '' for none: no "
                   "pod-traffic detection (upstream's no-op local detector), so no such masquerade and no "
                   "short-circuit of pods' traffic to Local-policy external IPs.")
@click.option("--nodeport-addresses", default="", metavar="CIDRS",
              help="Comma-separated CIDRs: NodePorts only on the node's addresses inside them (default: all).")
@click.option("--iptables-localhost-nodeports", "localhost_nodeports", type=click.BOOL, default=True,
              show_default=True, help="iptables mode: NodePorts answer on 127.0.0.0/8 too, where "
              "--nodeport-addresses allow it (route_localnet set in the node's namespace). Other modes "
              "never do, as upstream.")
@click.option("--masquerade-all", is_flag=True,
              help="Masquerade every packet to a ClusterIP, pods' too (upstream's flag).")
@click.option("--service-cidr", default="", metavar="CIDRS",
              help="The cluster's Service ranges, comma-separated: nftables mode drops traffic to their "
                   "unallocated addresses (default: none, no drop).")
@click.option("--min-sync-period", type=Duration(), default="1s", show_default=True,
              help="Least time between two syncs (0 for tests).")
@click.option("--ipvs-scheduler", default="rr", show_default=True,
              help="IPVS mode: the virtual services' scheduler (rr wrr lc wlc lblc lblcr sh dh sed nq).")
@click.option("--metrics-address", default="0.0.0.0:10249", show_default=True,
              help="Where /metrics and /healthz are served.")
@click.option("--cleanup", is_flag=True,
              help="Remove the rules every proxy mode made in this namespace, and exit (upstream's flag).")
@pass_target
def kube_proxy(target: Target, api: str | None, token_file: Path | None, node_name: str, proxy_mode: str,
               cluster_cidr: str, nodeport_addresses: str, localhost_nodeports: bool, masquerade_all: bool,
               service_cidr: str, min_sync_period: float, ipvs_scheduler: str, metrics_address: str,
               cleanup: bool) -> None:
    """Run kube-proxy in the current network namespace: Services -> iptables/nftables/IPVS rules.

    Its node IPs are the addresses it finds in that namespace."""
    from testbed.proxy import backends, nodeaddrs
    from testbed.proxy.flags import FlagError, KubeProxyFlags, node_settings
    from testbed.proxy.server import run

    if cleanup:
        click.echo(f"removed the rules of: {', '.join(backends.cleanup_all(node_name)) or 'no mode'}")
        return

    flags = KubeProxyFlags(node_name, proxy_mode, cluster_cidr, nodeport_addresses, masquerade_all, service_cidr,
                           localhost_nodeports, ipvs_scheduler)
    try:
        settings = node_settings(flags, nodeaddrs.local_ipv4_addresses(loopback=True))
    except FlagError as exc:
        raise click.BadParameter(exc.message, param_hint=exc.option) from None
    try:
        backend = backends.create(proxy_mode, settings)
    except backends.Unsupported as exc:
        raise click.ClickException(str(exc)) from None
    address, token = api_endpoint(target, api, token_file)
    run(address, token, node_name, backend, min_sync_period, metrics_address)


@click.command(name="cloud-controller")
@_api_options
@click.option("--pool", default="203.0.113.100-203.0.113.199", show_default=True,
              help="External IPs for LoadBalancer Services, A-B.")
@click.option("--feed-socket", type=click.Path(path_type=Path), default=None,
              help="Where the load balancer app reads the table (default: <state-dir>/lb.sock).")
@click.option("--health-interval", type=Duration(), default="500ms", show_default=True)
@click.option("--health-timeout", type=Duration(), default="400ms", show_default=True)
@click.option("--healthy-threshold", type=click.IntRange(1), default=2, show_default=True)
@click.option("--unhealthy-threshold", type=click.IntRange(1), default=2, show_default=True)
@pass_target
def cloud_controller(target: Target, api: str | None, token_file: Path | None, pool: str, feed_socket: Path | None,
                     health_interval: float, health_timeout: float, healthy_threshold: int,
                     unhealthy_threshold: int) -> None:
    """Play the cloud provider: external IPs and status for LoadBalancer Services, node health checks."""
    from testbed.cloud.cloud_controller import run
    from testbed.cloud.health import HealthSettings
    from testbed.cloud.ipam import parse_pool

    try:
        parse_pool(pool)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--pool") from None
    address, token = api_endpoint(target, api, token_file)
    run(address, token, pool, feed_socket or target.state.path / "lb.sock",
        HealthSettings(health_interval, health_timeout, healthy_threshold, unhealthy_threshold))


@click.command(name="lb-controller")
@click.option("--openflow-port", type=click.IntRange(1, 65535), required=True,
              help="Listen for the switch on 127.0.0.1:PORT.")
@click.option("--feed-socket", type=click.Path(path_type=Path), default=None,
              help="The cloud-controller's table (default: <state-dir>/lb.sock).")
@click.option("--gw-port", type=int, default=1, show_default=True, help="OpenFlow port of the router on the bridge.")
@click.option("--gw-mac", required=True, help="The router's MAC address on the bridge.")
@click.option("--ct-zone", type=click.IntRange(1, 65535), required=True,
              help="The cluster's conntrack zone (shared by every bridge of ovs-vswitchd: one per cluster).")
@pass_target
def lb_controller(target: Target, openflow_port: int, feed_socket: Path | None, gw_port: int, gw_mac: str,
                  ct_zone: int) -> None:
    """Run the OpenFlow load balancer (os-ken) for the edge bridge."""
    from controller.osken_app import Settings
    from controller.launch import run

    run(openflow_port, Settings(str(feed_socket or target.state.path / "lb.sock"), gw_port, gw_mac, ct_zone))
