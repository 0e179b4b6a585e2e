"""Pure parts of pod resources: quantities as apimachinery parses them, the kubelet's cpu
formulas, and reading /proc/self/mountinfo and /proc/self/cgroup of cgroup v1 and v2 machines
(the sandbox and the cgroups themselves run for real in tests/test_pod_sandbox.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from testbed.api import quantity
from testbed.node import cgroups

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, millicores", [("250m", 250), ("0.1", 100), ("1", 1000), ("1.5m", 2), ("2k", 2_000_000),
                                              ("100e-3", 100), (".5", 500)])
def test_cpu_quantities_in_millicores(text, millicores):
    assert quantity.millicores(text) == millicores


@pytest.mark.parametrize("text, size", [("128Mi", 128 << 20), ("1Gi", 1 << 30), ("1G", 10**9), ("129e6", 129_000_000),
                                        ("128974848", 128974848), ("0.5", 1), ("1.5Ki", 1536)])
def test_memory_quantities_in_bytes(text, size):
    assert quantity.byte_count(text) == size


@pytest.mark.parametrize("text, error", [("12XB", quantity.FORMAT_ERROR), ("", quantity.FORMAT_ERROR),
                                         ("1.2.3", quantity.FORMAT_ERROR), ("Mi", quantity.FORMAT_ERROR),
                                         ("1Mm", quantity.SUFFIX_ERROR), ("1KiB", quantity.FORMAT_ERROR)])
def test_bad_quantities(text, error):
    with pytest.raises(quantity.QuantityError, match=f"^{re.escape(error)}$"):
        quantity.parse(text)


def test_cpu_formulas_are_the_kubelets():
    assert cgroups.cpu_quota_us(500) == 50_000 and cgroups.cpu_quota_us(1) == cgroups.MIN_QUOTA_US
    assert cgroups.cpu_shares(100) == 102 and cgroups.cpu_shares(1000) == 1024 and cgroups.cpu_shares(0) == 2


V1_MOUNTINFO = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_mountinfo_of_v1_and_v2_machines():
    mounts = cgroups._cgroup_mounts(V1_MOUNTINFO)
    assert mounts == {"cpu": Path("/sys/fs/cgroup/cpu,cpuacct"), "memory": Path("/sys/fs/cgroup/memory"),
                      "pids": Path("/sys/fs/cgroup/pids")}  # the unified mount without controllers is not v2
    assert cgroups._cgroup_mounts(V2_MOUNTINFO) == {"": Path("/sys/fs/cgroup")}


def test_own_cgroup_paths_per_controller():
    own = cgroups._own_paths("9:name=systemd:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/user.slice/x.scope\n")
    assert own["memory"] == "/process_api/abc" and own["cpu"] == "/" and own["cpuacct"] == "/"
    assert own[""] == "/user.slice/x.scope"


def test_cluster_groups_sit_in_each_base():
    hierarchies = cgroups.Hierarchies(1, {"cpu": Path("/c/cpu"), "memory": Path("/c/memory/session")})
    group = cgroups.PodCgroup(hierarchies, "lab", "uid-1")
    assert group.paths == [Path("/c/cpu/svclab-lab/uid-1"), Path("/c/memory/session/svclab-lab/uid-1")]
