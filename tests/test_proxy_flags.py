"""kube-proxy's settings as the cluster config and the command take them (pure: no kernel).

What the settings do to packets is tested in tests/test_proxy_fidelity.py."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from testbed.cluster.config import ClusterConfig, ConfigError
from testbed.proxy.flags import FlagError, KubeProxyFlags, node_settings
from tests.conftest import REPO

pytestmark = pytest.mark.unit


def kube_proxy_help() -> str:
    r = subprocess.run([sys.executable, "-m", "testbed", "kube-proxy", "--help"], capture_output=True, text=True,
                       cwd=REPO, check=True)
    return " ".join(r.stdout.split())  # click wraps the help text


def test_masquerade_all_from_the_cluster_config_to_the_command():
    assert "--masquerade-all" not in ClusterConfig().kube_proxy_flags()
    config = ClusterConfig.from_dict({"kubeProxy": {"masqueradeAll": True}})
    assert config.masquerade_all is True and "--masquerade-all" in config.kube_proxy_flags()
    with pytest.raises(ConfigError, match="kubeProxy.masqueradeAll: 'yes please': must be true or false"):
        ClusterConfig.from_dict({"kubeProxy": {"masqueradeAll": "yes please"}})
    assert "--masquerade-all Masquerade every packet to a ClusterIP" in kube_proxy_help()


def test_service_cidr_from_the_cluster_config_to_the_backend_settings():
    config = ClusterConfig(service_subnet="10.100.0.0/16")
    flags = config.kube_proxy_flags()
    assert flags[flags.index("--service-cidr") + 1] == "10.100.0.0/16"
    settings = node_settings(KubeProxyFlags("n1", service_cidr="10.100.0.0/16, fd00:1::/112"), ("172.18.0.2",))
    assert settings.service_cidrs == ("10.100.0.0/16",)  # the IPv6 range ignored: IPv4 only
    assert node_settings(KubeProxyFlags("n1"), ()).service_cidrs == ()  # default: no drop, as upstream without
    with pytest.raises(FlagError, match="--service-cidr: '10.96.0.0/33' is not a CIDR"):
        node_settings(KubeProxyFlags("n1", service_cidr="10.96.0.0/33"), ())


def test_empty_cluster_cidr_means_no_local_traffic_detector_and_the_help_says_so():
    assert node_settings(KubeProxyFlags("n1", cluster_cidr=""), ()).cluster_cidr is None
    assert node_settings(KubeProxyFlags("n1"), ()).cluster_cidr == "10.244.0.0/16"
    with pytest.raises(FlagError, match="--cluster-cidr: 'pods' is not an IPv4 CIDR"):
        node_settings(KubeProxyFlags("n1", cluster_cidr="pods"), ())
    assert "'' for none: no pod-traffic detection (upstream's no-op local detector)" in kube_proxy_help()


ADDRESSES = ("10.244.1.1", "127.0.0.1", "172.18.0.2")  # a node's, loopback included


def nodeports(mode: str, cidrs: str, localhost: bool = True) -> tuple[str, ...]:
    flags = KubeProxyFlags("n1", mode, nodeport_addresses=cidrs, localhost_nodeports=localhost)
    return node_settings(flags, ADDRESSES).nodeport_addresses


def test_nodeport_addresses_of_the_other_family_are_ignored_and_logged(caplog):
    with caplog.at_level(logging.WARNING, "svclab.kube-proxy"):
        assert nodeports("iptables", "fd00::/64, 172.18.0.0/16") == ("172.18.0.2",)
        assert nodeports("nftables", "fd00::/64") == ()  # no IPv4 CIDR left: every address, as upstream
    assert caplog.text.count("--nodeport-addresses: ignoring fd00::/64: not an IPv4 CIDR") == 2


def test_localhost_nodeport_addresses_iptables_mode_only(caplog):
    assert nodeports("iptables", "127.0.0.0/8") == ("127.0.0.1",)
    assert nodeports("iptables", "0.0.0.0/0") == ()  # match-all, as no flag
    settings = node_settings(KubeProxyFlags("n1", "iptables"), ADDRESSES)
    assert settings.localhost_nodeports and settings.node_ips == ("10.244.1.1", "172.18.0.2")
    assert not node_settings(KubeProxyFlags("n1", "nftables"), ADDRESSES).localhost_nodeports
    with caplog.at_level(logging.ERROR, "svclab.kube-proxy"):
        assert nodeports("nftables", "127.0.0.0/8,172.18.0.0/16") == ("172.18.0.2",)
        assert nodeports("iptables", "127.0.0.0/8,172.18.0.0/16", localhost=False) == ("172.18.0.2",)
    assert caplog.text.count("--nodeport-addresses includes localhost (127.0.0.1)") == 2
    with pytest.raises(FlagError, match=r"only localhost addresses \(127.0.0.1\) are inside 127.0.0.0/8"):
        nodeports("nftables", "127.0.0.0/8")
    assert "--iptables-localhost-nodeports BOOLEAN iptables mode: NodePorts answer on 127.0.0.0/8" \
        in kube_proxy_help()


def test_ipvs_scheduler_from_the_cluster_config_to_the_backend_settings():
    config = ClusterConfig.from_dict({"kubeProxy": {"mode": "ipvs", "ipvs": {"scheduler": "lc"}}})
    flags = config.kube_proxy_flags()
    assert flags[flags.index("--ipvs-scheduler") + 1] == "lc"
    assert "--ipvs-scheduler" not in ClusterConfig().kube_proxy_flags()  # the other modes never read it
    with pytest.raises(ConfigError, match="kubeProxy.ipvs.scheduler: 'fastest': must be one of rr, wrr"):
        ClusterConfig.from_dict({"kubeProxy": {"ipvs": {"scheduler": "fastest"}}})
    with pytest.raises(ConfigError, match=r"kubeProxy.ipvs.syncPeriod: unknown setting \(known: scheduler\)"):
        ClusterConfig.from_dict({"kubeProxy": {"ipvs": {"scheduler": "rr", "syncPeriod": "30s"}}})
    with pytest.raises(ConfigError, match="kubeProxy.ipvs: 'rr': must be a mapping"):
        ClusterConfig.from_dict({"kubeProxy": {"ipvs": "rr"}})
    assert node_settings(KubeProxyFlags("n1", "ipvs", ipvs_scheduler="sh"), ()).ipvs_scheduler == "sh"
    with pytest.raises(FlagError, match="--ipvs-scheduler: 'fastest': use one of rr, wrr"):
        node_settings(KubeProxyFlags("n1", "ipvs", ipvs_scheduler="fastest"), ())
    assert node_settings(KubeProxyFlags("n1", ipvs_scheduler="fastest"), ()).ipvs_scheduler == "fastest"  # unread
    assert "--ipvs-scheduler TEXT IPVS mode: the virtual services' scheduler" in kube_proxy_help()
