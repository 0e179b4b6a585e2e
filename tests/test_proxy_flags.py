"""kube-proxy's settings as the cluster config and the command take them (pure: no kernel).

What the settings do to packets is tested in tests/test_proxy_fidelity.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from testbed.cluster.config import ClusterConfig, ConfigError
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
