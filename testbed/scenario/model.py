"""The scenario file as pydantic models (scenarios/README.md documents every key).

These models check each value on its own (types, units, the syntax of references and
templates, keys that go together); what needs the whole file (names that must exist, times in
order, nodes within cluster.nodes, manifests that parse) is checked by
testbed/scenario/checks.py, which load_scenario() runs too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from testbed.cluster.config import MODES, ClusterConfig
from testbed.manifests import Manifest
from testbed.scenario.actions import (ACTIONS, COMPONENTS, NODE_COMPONENTS, Action, ActionBase, ManifestRef, Trigger,
                                      load_manifests)
from testbed.scenario.base import Strict, text_type
from testbed.scenario.syntax import (WHOLE_RUN, Address, HostValue, Name, PodsTarget, ScenarioName, WindowValue,
                                     check_node, templates_in)
from testbed.scenario.units import ComparisonValue, Duration, PositiveDuration, Rate, format_duration

__all__ = ["ACTIONS", "COMPONENTS", "NODE_COMPONENTS", "Action", "ActionBase", "ManifestRef", "Trigger",  # actions.py
           "load_manifests",
           "ClusterSpec", "TrafficSpec", "Balance", "Rules", "Check", "Assertion", "Scenario", "TRAFFIC_CHECKS",
           "CLUSTER_CHECKS", "default_cluster_name"]


class ClusterSpec(Strict):
    """The cluster to run on: `svclab up --config`'s settings (testbed/cluster/config.py checks
    their values), plus proxyMode: one mode, or a list to run the scenario once per mode."""

    name: str | None = None
    nodes: int = ClusterConfig.nodes
    proxy_mode: list[str] | None = None
    networking: dict[str, Any] | None = None
    kube_proxy: dict[str, Any] | None = None
    node_monitor_grace_period: Duration | None = None
    load_balancer: dict[str, Any] | None = None

    @field_validator("proxy_mode", mode="before")
    @classmethod
    def _modes(cls, value: Any) -> Any:
        modes = [value] if isinstance(value, str) else value
        if isinstance(modes, list):
            for mode in modes:
                if mode not in MODES:
                    raise ValueError(f"unknown proxy mode {mode!r} (known: {', '.join(MODES)})")
            if len(set(modes)) != len(modes) or not modes:
                raise ValueError("give each proxy mode once")
        return modes

    @property
    def proxy_modes(self) -> list[str]:
        """The modes to run in: proxyMode, else kubeProxy.mode, else the cluster default."""
        if self.proxy_mode:
            return list(self.proxy_mode)
        return [(self.kube_proxy or {}).get("mode") or ClusterConfig.proxy_mode]

    def settings(self, name: str, proxy_mode: str | None = None) -> dict[str, Any]:
        """The cluster config file's mapping (what ClusterConfig.from_dict and `svclab up --config` take)."""
        out: dict[str, Any] = {"name": name, "nodes": self.nodes}
        kube_proxy = dict(self.kube_proxy or {})
        kube_proxy["mode"] = proxy_mode or self.proxy_modes[0]
        out["kubeProxy"] = kube_proxy
        if self.networking is not None:
            out["networking"] = dict(self.networking)
        if self.node_monitor_grace_period is not None:
            out["nodeMonitorGracePeriod"] = format_duration(self.node_monitor_grace_period)
        if self.load_balancer is not None:
            out["loadBalancer"] = dict(self.load_balancer)
        return out


class TrafficSpec(Strict):
    """A named traffic generator: requests from a host (client, nodeN, pod:<name or selector>) to
    an address, at a fixed rate, from start to stop (default: the whole run). keepalive: `pool`
    connections (default 1) kept open and used round robin."""

    name: Name
    source: HostValue = Field(alias="from")
    destination: Address = Field(alias="to")
    protocol: Literal["http", "tcp", "udp"] | None = None
    rate: Rate
    connections: Literal["new", "keepalive"] = "new"
    pool: int | None = Field(default=None, ge=1, le=64)
    timeout: PositiveDuration = 1.0
    start: Duration = 0.0
    stop: Duration | None = None

    @model_validator(mode="after")
    def _address_fits_protocol(self) -> "TrafficSpec":
        is_url = "://" in self.destination
        if is_url and not self.destination.startswith("http://"):
            raise ValueError(f"to: {self.destination!r}: only http:// URLs (or host:port for tcp and udp)")
        if self.protocol in ("tcp", "udp") and is_url:
            raise ValueError(f"to: {self.destination!r}: protocol {self.protocol} takes host:port, not a URL")
        host_port = None if is_url else _HOST_PORT.match(_placeholders(self.destination))
        if not is_url and not (host_port and 0 < int(host_port.group(1)) < 65536):
            raise ValueError(f"to: {self.destination!r}: want a URL (http://frontend-service/) or host:port "
                             "(a port from 1 to 65535)")
        if self.protocol == "http" and not is_url:
            raise ValueError(f"to: {self.destination!r}: protocol http takes a URL (http://host[:port]/path)")
        if self.connections == "keepalive" and self.protocol == "udp":
            raise ValueError("connections: keepalive is for tcp and http (udp has no connections)")
        if self.pool is not None and self.connections != "keepalive":
            raise ValueError("pool: how many kept connections, with connections: keepalive only")
        return self

    @property
    def kind(self) -> str:
        """The protocol: as given, else http for a URL and tcp for host:port."""
        return self.protocol or ("http" if "://" in self.destination else "tcp")


_HOST_PORT = re.compile(r"^[A-Za-z0-9._-]+:(\d{1,5})$")


def _placeholders(text: str) -> str:
    """text with its templates replaced by plausible values, to check the address's shape."""
    for template in templates_in(text):
        text = text.replace(template.text, "30000" if template.kind == "nodePort" else "10.0.0.1")
    return text


class Balance(Strict):
    """How evenly the answering pods share the requests: every pod's share within `tolerance`
    of the even share (0.25: 1/n +- 25 %), or a chi-square test of evenness whose p-value is
    at least `pValue`. `pods`: how many pods must answer (default: those that did)."""

    tolerance: float | None = Field(default=None, gt=0, le=1)
    p_value: float | None = Field(default=None, gt=0, lt=1)
    pods: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_test(self) -> "Balance":
        if (self.tolerance is None) == (self.p_value is None):
            raise ValueError("give either tolerance: (max deviation from the even share) or pValue: (chi-square)")
        return self


def _rules_node(value: Any) -> str:
    return value if value == "all" else check_node(value)


RulesNode = text_type(_rules_node)


class Rules(Strict):
    """What a node's kube-proxy rules hold at the window's end: `contains` or `notContains` an
    endpoint (an address, templates allowed: "${podIP:app=frontend}:8080"); node: nodeN or all."""

    node: RulesNode
    contains: Address | None = None
    not_contains: Address | None = None

    @model_validator(mode="after")
    def _one_test(self) -> "Rules":
        if (self.contains is None) == (self.not_contains is None):
            raise ValueError("give either contains: or notContains: (an endpoint, e.g. ${podIP:frontend-abc}:8080)")
        return self


#: Assertion keys that measure a traffic generator's requests (they need `traffic:`).
TRAFFIC_CHECKS = ("successRate", "maxConsecutiveFailures", "latencyP99", "balance", "clientIP", "failoverWithin",
                  "noTrafficTo")
CLUSTER_CHECKS = ("convergedWithin", "rules")


@dataclass(frozen=True)
class Check:
    """One check of an assertion: its key (successRate, ...), its value, the expected text."""

    kind: str
    value: Any
    expected: str


class Assertion(Strict):
    """Checks over a window of the run: each key present is one check (an assertion may hold
    several, e.g. successRate and balance); traffic names the generator they measure."""

    name: str | None = None
    traffic: str | None = None
    window: WindowValue = WHOLE_RUN
    success_rate: ComparisonValue | None = None
    max_consecutive_failures: int | None = Field(default=None, ge=0)
    latency_p99: ComparisonValue | None = Field(default=None, alias="latencyP99")
    balance: Balance | None = None
    client_ip: Literal["preserved", "masqueraded"] | None = Field(default=None, alias="clientIP")
    failover_within: PositiveDuration | None = None
    no_traffic_to: PodsTarget | None = None
    converged_within: PositiveDuration | None = None
    rules: Rules | None = None

    @model_validator(mode="after")
    def _checks(self) -> "Assertion":
        if not self.checks():
            raise ValueError(f"no check: give one or more of {', '.join(TRAFFIC_CHECKS + CLUSTER_CHECKS)}")
        if self.success_rate and not (self.success_rate.unit != "duration" and 0 <= self.success_rate.value <= 1):
            raise ValueError(f"successRate: {self.success_rate}: a fraction from 0 to 1 (or a percent)")
        if self.latency_p99 and self.latency_p99.unit != "duration":
            raise ValueError(f"latencyP99: {self.latency_p99}: compare with a time, e.g. \"<= 200ms\"")
        return self

    def checks(self) -> list[Check]:
        """The checks present, in the order of TRAFFIC_CHECKS + CLUSTER_CHECKS."""
        out = []
        for key in TRAFFIC_CHECKS + CLUSTER_CHECKS:
            value = getattr(self, _field_of[key])
            if value is not None:
                out.append(Check(key, value, _expected(key, value)))
        return out

    @property
    def label(self) -> str:
        """Its name, else what it checks and where: "web: successRate >= 0.99 [crash+3s, end]"."""
        if self.name:
            return self.name
        what = ", ".join(f"{c.kind} {c.expected}" for c in self.checks())
        return f"{self.traffic + ': ' if self.traffic else ''}{what} {self.window}"


_field_of = {field.alias or name: name for name, field in Assertion.model_fields.items()}


def _expected(key: str, value: Any) -> str:
    if key in ("failoverWithin", "convergedWithin"):
        return f"<= {format_duration(value)}"
    if key == "maxConsecutiveFailures":
        return f"<= {value}"
    if key == "balance":
        test = f"tolerance {value.tolerance}" if value.tolerance is not None else f"chi-square p >= {value.p_value}"
        return test + (f", {value.pods} pods" if value.pods else "")
    if key == "noTrafficTo":
        return f"0 requests to {value}"
    if key == "rules":
        what = f"contains {value.contains}" if value.contains else f"lacks {value.not_contains}"
        return f"{value.node} {what}"
    return str(value)


class Scenario(Strict):
    """A whole scenario file. load_scenario() (testbed/scenario/loader.py) reads and checks one."""

    name: ScenarioName
    description: str = ""
    cluster: ClusterSpec = ClusterSpec()
    manifests: list[ManifestRef] = []
    duration: PositiveDuration
    seed: int = 0
    traffic: list[TrafficSpec] = []
    timeline: list[Action] = []
    assertions: list[Assertion] = []

    _path: Path | None = PrivateAttr(default=None)

    @property
    def path(self) -> Path | None:
        """The file it was loaded from (manifest files are relative to its directory)."""
        return self._path

    @property
    def base_dir(self) -> Path:
        return self._path.parent if self._path else Path.cwd()

    def manifest_objects(self) -> Manifest:
        """The API objects of manifests:, in order (testbed/client/apply.py's apply_objects takes them)."""
        return load_manifests(self.manifests, self.base_dir)

    def generator(self, name: str) -> TrafficSpec:
        return next(t for t in self.traffic if t.name == name)

    def cluster_name(self) -> str:
        """The cluster's name when none is given: cluster.name, else the scenario's name as a
        cluster name may be written (lower-case letters and digits, at most 8: "nodefail")."""
        return self.cluster.name or default_cluster_name(self.name)

    def cluster_settings(self, name: str | None = None, proxy_mode: str | None = None) -> dict[str, Any]:
        """The cluster config file's mapping for one run (`svclab up --config` takes it as YAML)."""
        return self.cluster.settings(name or self.cluster_name(), proxy_mode)

    def cluster_config(self, name: str | None = None, proxy_mode: str | None = None) -> ClusterConfig:
        """The ClusterConfig to bring the cluster up with (testbed/cluster/lifecycle.py's Cluster takes it);
        ConfigError for a bad setting (load_scenario has already refused those)."""
        return ClusterConfig.from_dict(self.cluster_settings(name, proxy_mode))

    def with_seed(self, seed: int | None) -> "Scenario":
        """The same scenario with another seed (`svclab run --seed N`); itself for None."""
        if seed is None:
            return self
        copy = self.model_copy(update={"seed": seed})
        copy._path = self._path
        return copy


def default_cluster_name(scenario_name: str) -> str:
    """A valid cluster name (testbed/naming.py: [a-z][a-z0-9]{0,7}) made from a scenario's name."""
    letters = re.sub(r"[^a-z0-9]", "", scenario_name.lower())
    if not letters or not letters[0].isalpha():
        letters = "s" + letters
    return letters[:8]
