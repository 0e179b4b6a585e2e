"""A cluster's shape, like kind's cluster config: defaults, YAML file, flags.

    # svclab up --config lab.yaml
    name: lab
    nodes: 3
    networking:
      nodeSubnet: 172.18.0.0/16
      podSubnet: 10.244.0.0/16
      serviceSubnet: 10.96.0.0/12
      externalSubnet: 203.0.113.0/24
      loadBalancerPool: 203.0.113.100-203.0.113.199
      nodePortRange: 30000-32767
    kubeProxy:
      mode: iptables          # iptables | nftables | ipvs
      minSyncPeriod: 1s
      masqueradeAll: false    # masquerade every packet to a ClusterIP (kube-proxy --masquerade-all)
      ipvs:
        scheduler: rr         # IPVS mode: rr | wrr | lc | wlc | lblc | lblcr | sh | dh | sed | nq
    nodeMonitorGracePeriod: 5s
    loadBalancer:             # the cloud load balancer (cloud-controller + OpenFlow app)
      healthCheckInterval: 500ms
      healthCheckTimeout: 400ms
      healthyThreshold: 2
      unhealthyThreshold: 2
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from testbed.naming import check_cluster_name
from testbed.proxy.backends import MODES



class ConfigError(ValueError):
    """A bad setting; the message names it."""


def parse_duration(text: str | float | int) -> float:
    """Go-style durations as Kubernetes flags take them: 500ms, 5s, 1m30s; a bare number is seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    try:
        return float(text)
    except (TypeError, ValueError):
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(text))
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r} (e.g. 500ms, 5s, 1m)")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


@dataclass(frozen=True)
class ClusterConfig:
    name: str = "svclab"
    nodes: int = 3
    node_subnet: str = "172.18.0.0/16"
    pod_subnet: str = "10.244.0.0/16"
    service_subnet: str = "10.96.0.0/12"
    external_subnet: str = "203.0.113.0/24"
    load_balancer_pool: str = "203.0.113.100-203.0.113.199"
    node_port_range: str = "30000-32767"
    proxy_mode: str = "iptables"
    min_sync_period: float = 1.0
    masquerade_all: bool = False
    ipvs_scheduler: str = "rr"
    node_monitor_grace_period: float = 5.0
    lb_health_interval: float = 0.5
    lb_health_timeout: float = 0.4
    lb_healthy_threshold: int = 2
    lb_unhealthy_threshold: int = 2

    def __post_init__(self) -> None:
        try:
            check_cluster_name(self.name)
        except ValueError as exc:
            raise ConfigError(f"name: {exc}") from None
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int) or not 1 <= self.nodes <= 200:
            raise ConfigError(f"nodes: {self.nodes!r}: must be a number from 1 to 200")
        nets = {}
        for key in ("node_subnet", "pod_subnet", "service_subnet", "external_subnet"):
            try:
                nets[key] = ipaddress.IPv4Network(getattr(self, key), strict=True)
            except ValueError as exc:
                raise ConfigError(f"networking.{_camel(key)}: {getattr(self, key)!r}: {exc}") from None
        names = list(nets)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if nets[a].overlaps(nets[b]):
                    raise ConfigError(f"networking.{_camel(a)} {nets[a]} overlaps networking.{_camel(b)} {nets[b]}")
        if nets["pod_subnet"].prefixlen > 24 - max(1, (self.nodes - 1).bit_length()):
            raise ConfigError(f"networking.podSubnet: {nets['pod_subnet']} has too few /24s for {self.nodes} nodes")
        low, high = self.load_balancer_range
        if not (low in nets["external_subnet"] and high in nets["external_subnet"] and low <= high):
            raise ConfigError(f"networking.loadBalancerPool: {self.load_balancer_pool!r}: must be A-B inside "
                              f"the external subnet {nets['external_subnet']}")
        if int(high) - int(low) + 1 > MAX_POOL:
            raise ConfigError(f"networking.loadBalancerPool: {self.load_balancer_pool!r}: more than {MAX_POOL} "
                              f"addresses (the load balancer's group ids hold 14 bits of the IP)")
        ext = nets["external_subnet"]
        for what, reserved in (("router", ext.network_address + 1), ("client", ext.network_address + 2)):
            if low <= reserved <= high:
                raise ConfigError(f"networking.loadBalancerPool: {self.load_balancer_pool!r} contains the {what}'s "
                                  f"address {reserved}")
        if not 0 < self.lb_health_timeout <= self.lb_health_interval:
            raise ConfigError(f"loadBalancer.healthCheckTimeout: {self.lb_health_timeout}s: must be more than 0 and "
                              f"at most healthCheckInterval ({self.lb_health_interval}s)")
        for key, value in (("healthyThreshold", self.lb_healthy_threshold),
                           ("unhealthyThreshold", self.lb_unhealthy_threshold)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"loadBalancer.{key}: {value!r}: must be a whole number >= 1")
        if not isinstance(self.masquerade_all, bool):
            raise ConfigError(f"kubeProxy.masqueradeAll: {self.masquerade_all!r}: must be true or false")
        from testbed.proxy.ipvs.names import SCHEDULERS
        if self.ipvs_scheduler not in SCHEDULERS:
            raise ConfigError(f"kubeProxy.ipvs.scheduler: {self.ipvs_scheduler!r}: must be one of {', '.join(SCHEDULERS)}")
        if self.proxy_mode not in MODES:
            raise ConfigError(f"kubeProxy.mode: {self.proxy_mode!r}: must be one of {', '.join(MODES)}")
        try:
            a, b = (int(x) for x in self.node_port_range.split("-"))
            assert 0 < a <= b <= 65535
        except (ValueError, AssertionError):
            raise ConfigError(f"networking.nodePortRange: {self.node_port_range!r}: want A-B, like 30000-32767") from None

    @property
    def load_balancer_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        try:
            low, high = (ipaddress.IPv4Address(x.strip()) for x in self.load_balancer_pool.split("-"))
        except ValueError:
            raise ConfigError(f"networking.loadBalancerPool: {self.load_balancer_pool!r}: want A-B") from None
        return low, high

    @property
    def dns_ip(self) -> str:
        """Cluster DNS: the 10th address of the service subnet (10.96.0.10), as kubeadm picks it."""
        return str(ipaddress.IPv4Network(self.service_subnet).network_address + 10)

    def kube_proxy_flags(self) -> list[str]:
        """The kube-proxy command's flags for what this config says of kube-proxy."""
        flags = ["--proxy-mode", self.proxy_mode, "--cluster-cidr", self.pod_subnet,
                 "--service-cidr", self.service_subnet, "--min-sync-period", str(self.min_sync_period)]
        if self.masquerade_all:
            flags.append("--masquerade-all")
        if self.proxy_mode == "ipvs":
            flags += ["--ipvs-scheduler", self.ipvs_scheduler]
        return flags

    def with_overrides(self, **values: Any) -> "ClusterConfig":
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_file(cls, path: Path) -> "ClusterConfig":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: want a mapping of settings")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "ClusterConfig":
        values: dict[str, Any] = {}
        for key in data:
            if key not in TOP_KEYS:
                raise ConfigError(f"{key}: unknown setting (known: {', '.join(sorted(TOP_KEYS))})")
        for key in ("name", "nodes"):
            if key in data:
                values[key] = data[key]
        networking = data.get("networking") or {}
        net_fields = {_camel(f.name): f.name for f in fields(cls) if f.name.endswith(("subnet", "pool", "range"))}
        for key, value in networking.items():
            if key not in net_fields:
                raise ConfigError(f"networking.{key}: unknown setting (known: {', '.join(sorted(net_fields))})")
            values[net_fields[key]] = str(value)
        proxy = data.get("kubeProxy") or {}
        for key, value in proxy.items():
            if key == "mode":
                values["proxy_mode"] = value
            elif key == "minSyncPeriod":
                values["min_sync_period"] = _duration(f"kubeProxy.{key}", value)
            elif key == "ipvs":
                values["ipvs_scheduler"] = _ipvs_scheduler(value)
            elif key == "masqueradeAll":
                values["masquerade_all"] = value
            else:
                raise ConfigError(f"kubeProxy.{key}: unknown setting (known: ipvs.scheduler, masqueradeAll, minSyncPeriod, mode)")
        if "nodeMonitorGracePeriod" in data:
            values["node_monitor_grace_period"] = _duration("nodeMonitorGracePeriod", data["nodeMonitorGracePeriod"])
        lb = data.get("loadBalancer") or {}
        for key, value in lb.items():
            if key in LB_REMOVED:
                raise ConfigError(f"loadBalancer.{key}: no longer a setting: {LB_REMOVED[key]}")
            if key not in LB_KEYS:
                raise ConfigError(f"loadBalancer.{key}: unknown setting (known: {', '.join(sorted(LB_KEYS))})")
            field_name, is_duration = LB_KEYS[key]
            values[field_name] = _duration(f"loadBalancer.{key}", value) if is_duration else value
        return cls(**values)


#: The file's top-level keys (kind and apiVersion are accepted and ignored, as kind's config has them).
TOP_KEYS = frozenset({"name", "nodes", "networking", "kubeProxy", "nodeMonitorGracePeriod", "loadBalancer", "kind",
                      "apiVersion"})
#: loadBalancer.<key> -> (ClusterConfig field, is a duration)
LB_KEYS = {
    "healthCheckInterval": ("lb_health_interval", True),
    "healthCheckTimeout": ("lb_health_timeout", True),
    "healthyThreshold": ("lb_healthy_threshold", False),
    "unhealthyThreshold": ("lb_unhealthy_threshold", False),
}
#: loadBalancer.<key> that went, and why
LB_REMOVED = {
    "idleTimeout": "connections live in the edge switch's connection tracker, which times them out itself",
}
MAX_POOL = 1 << 14


def _ipvs_scheduler(section: Any) -> str:
    """kubeProxy.ipvs: a mapping whose one known key is scheduler (upstream's KubeProxyIPVSConfiguration)."""
    if not isinstance(section, dict):
        raise ConfigError(f"kubeProxy.ipvs: {section!r}: must be a mapping, e.g. {{scheduler: rr}}")
    for key in section:
        if key != "scheduler":
            raise ConfigError(f"kubeProxy.ipvs.{key}: unknown setting (known: scheduler)")
    return str(section.get("scheduler") or "rr")


def _duration(key: str, value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(w.capitalize() for w in rest)
