"""`command:` pods in their sandbox (testbed/node/sandbox.py) and cgroups (testbed/node/cgroups.py),
on a real 1-node cluster whose state lives where a default cluster's does (/var/lib/svclab/<name>).

Each pod reports what it sees from inside (its command prints JSON to its log); the tests read
the cgroup files from the host, as an operator would.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
import time
from pathlib import Path

import pytest

from testbed import naming
from testbed.node import cgroups
from testbed.paths import DEFAULT_STATE_ROOT
from tests.test_cluster import LabCluster, cluster_name, down_and_check, pods_by_name

pytestmark = pytest.mark.cluster

REPORT = r"""
import json, os, sys, time
def listing(path):
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return None
    except PermissionError:
        return "denied"
marker = os.environ["POD_NAME"] + "-was-here"
open("/tmp/" + marker, "w").write("x")
print(json.dumps({
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "pid1": open("/proc/1/cmdline", "rb").read().decode(errors="replace"),
    "me": os.getpid(), "hostname": os.uname().nodename,
    "tmp": listing("/tmp"), "var_lib_svclab": listing(sys.argv[1]), "state": listing(sys.argv[2]),
    "run_netns": listing("/run/netns"), "etc_netns": listing("/etc/netns"),
}), flush=True)
time.sleep(600)
"""

HOG = """
import time
blocks = []
for i in range(50):  # 400 MiB at most, 8 MiB at a time
    blocks.append(bytearray(8 << 20))
    print("allocated", (i + 1) * 8, "MiB", flush=True)
time.sleep(600)
"""


def command_pod(name: str, argv: list[str], resources: dict | None = None, restart_policy: str = "") -> str:
    spec = {"containers": [_container(argv, resources)], **({"restartPolicy": restart_policy} if restart_policy else {})}
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


def command_deployment(name: str, argv: list[str], resources: dict) -> str:
    """One replica; a Deployment's pods restart Always."""
    template = {"metadata": {"labels": {"app": name}}, "spec": {"containers": [_container(argv, resources)]}}
    return json.dumps({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                       "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": template}})


def _container(argv: list[str], resources: dict | None) -> dict:
    return {"name": "c", "image": "python", "command": argv, **({"resources": resources} if resources else {})}


@pytest.fixture(scope="module")
def lab():
    cluster = LabCluster(DEFAULT_STATE_ROOT, cluster_name())
    try:
        cluster.up("--nodes", "1")
        yield cluster
    finally:
        down_and_check(cluster)


def suffix() -> str:
    return "".join(random.choices(string.ascii_lowercase, k=5))


def wait_pod(cluster: LabCluster, name: str, check, timeout: float = 45) -> dict:
    """The pod called `name` (or the first whose name starts with `name-`: a Deployment's) once check holds."""
    deadline = time.monotonic() + timeout
    while True:
        pods = pods_by_name(cluster)
        pod = pods.get(name) or next((p for n, p in sorted(pods.items()) if n.startswith(f"{name}-")), {})
        if pod and check(pod):
            return pod
        assert time.monotonic() < deadline, pod
        time.sleep(0.2)


def container_status(pod: dict) -> dict:
    return (pod.get("status", {}).get("containerStatuses") or [{}])[0]


def running(pod: dict) -> bool:
    return pod.get("status", {}).get("phase") == "Running"


def pod_log(cluster: LabCluster, pod: dict) -> Path:
    netns = naming.pod_netns(cluster.name, pod["metadata"]["uid"])
    return cluster.state / "nodes" / "node1" / "pods" / f"{netns}.log"


def report_of(cluster: LabCluster, name: str, timeout: float = 30) -> dict:
    pod = wait_pod(cluster, name, running)
    deadline = time.monotonic() + timeout
    while True:
        text = pod_log(cluster, pod).read_text() if pod_log(cluster, pod).exists() else ""
        if text.strip().startswith("{"):
            return json.loads(text.splitlines()[0])
        assert time.monotonic() < deadline, text
        time.sleep(0.1)


def start_probe(cluster: LabCluster, name: str) -> dict:
    argv = ["python3", "-c", REPORT, str(DEFAULT_STATE_ROOT), str(cluster.state)]
    cluster.svclab("apply", "-f", "-", input=command_pod(name, argv), check=True)
    return report_of(cluster, name)


def pod_cgroup_dirs(cluster: LabCluster, uid: str) -> list[Path]:
    return [group / uid for group in cgroups.find_cluster_groups(cluster.name)]


def test_a_command_pod_sees_only_its_own_processes(lab):
    name = f"probe-{suffix()}"
    report = start_probe(lab, name)
    # PID 1 is the pod's init (the sandbox); the command (python3 -c) and nothing of the host
    assert "sandbox.py" in report["pid1"], report
    assert report["pids"] == [1, report["me"]], report
    assert report["hostname"] == name
    # `svclab exec` enters the same sandbox, as `kubectl exec` enters the container
    seen = lab.exec(name, "ps", "-e", "-o", "pid=,args=").stdout.splitlines()
    assert len(seen) <= 4 and seen[0].split()[0] == "1", seen  # init, the command, ps (under nsenter)
    assert not any("svclab" in line and "sandbox.py" not in line for line in seen), seen
    lab.svclab("delete", "pod", name, check=True)


def test_private_tmp_and_no_view_of_svclab_state_or_other_pods(lab):
    first, second = f"probe-{suffix()}", f"probe-{suffix()}"
    host_file = DEFAULT_STATE_ROOT / f"{lab.name}-host-secret"
    host_file.write_text("the host's")
    try:
        report_a = start_probe(lab, first)
        assert report_a["tmp"] == [f"{first}-was-here"], report_a  # a fresh /tmp with its own file only
        report_b = start_probe(lab, second)  # started after the first wrote its /tmp
    finally:
        host_file.unlink()
    assert report_b["tmp"] == [f"{second}-was-here"], report_b  # not the other pod's file
    assert not (Path("/tmp") / f"{first}-was-here").exists()  # nor written to the host's /tmp
    for report in (report_a, report_b):
        assert report["var_lib_svclab"] == [], report  # the host's svclab state: an empty directory
        assert report["state"] in (None, []), report  # the cluster's state dir, other pods' logs
        assert report["run_netns"] == [] and report["etc_netns"] == [], report  # namespaces, resolv.confs
    lab.svclab("delete", "pod", first, second, check=True)


def test_a_deployment_pod_over_its_memory_limit_is_oomkilled_and_restarted_with_back_off(lab):
    name = f"hog-{suffix()}"
    lab.svclab("apply", "-f", "-", check=True,
               input=command_deployment(name, ["python3", "-c", HOG], {"limits": {"memory": "48Mi"}}))

    def backing_off(pod: dict) -> bool:  # killed twice: restarted at once, then waiting 10 s
        status = container_status(pod)
        return (status.get("restartCount", 0) >= 1 and status.get("state", {}).get("waiting", {}).get("reason")
                == "CrashLoopBackOff" and status.get("lastState", {}).get("terminated", {}).get("reason") == "OOMKilled")

    pod = wait_pod(lab, name, backing_off, timeout=30)
    assert pod["status"]["phase"] == "Running", pod["status"]  # Always: the pod lives on, its container restarts
    last = container_status(pod)["lastState"]["terminated"]
    assert last["exitCode"] == 137 and last["signal"] == 9, last
    assert "48Mi" in last["message"] and last["startedAt"] and last["finishedAt"], last
    described = lab.svclab("describe", "pod", pod["metadata"]["name"], check=True).stdout
    assert "Last State: Terminated" in described and "Reason:     OOMKilled" in described, described
    assert "State:      Waiting" in described and "Reason:     CrashLoopBackOff" in described, described
    assert int(re.search(r"Restart Count: (\d+)", described).group(1)) >= 1, described
    assert "CrashLoopBackOff" in lab.svclab("get", "pod", pod["metadata"]["name"], check=True).stdout
    again = wait_pod(lab, name, lambda p: container_status(p).get("restartCount", 0) >= 2, timeout=30)
    assert again["metadata"]["uid"] == pod["metadata"]["uid"]  # restarted in the same pod, not replaced
    assert container_status(again)["lastState"]["terminated"]["reason"] == "OOMKilled"
    log = pod_log(lab, again).read_text()  # every run is capped by the limit, not only the first
    assert log.count("allocated 8 MiB") >= 2 and "allocated 400 MiB" not in log, log
    lab.svclab("delete", "deployment", name, check=True)


def test_a_never_restarted_pod_over_its_memory_limit_is_oomkilled_and_failed(lab):
    name = f"hog-{suffix()}"
    lab.svclab("apply", "-f", "-", check=True,
               input=command_pod(name, ["python3", "-c", HOG], {"limits": {"memory": "48Mi"}}, "Never"))
    pod = wait_pod(lab, name, lambda p: p.get("status", {}).get("phase") == "Failed")
    assert pod["status"]["reason"] == "OOMKilled", pod["status"]
    status = container_status(pod)
    terminated = status["state"]["terminated"]
    assert terminated["reason"] == "OOMKilled" and terminated["exitCode"] == 137, terminated
    assert status.get("restartCount", 0) == 0 and not status.get("lastState"), status
    log = pod_log(lab, pod).read_text()
    assert "allocated 8 MiB" in log and "allocated 400 MiB" not in log, log
    assert "OOMKilled" in lab.svclab("get", "pod", name, check=True).stdout
    assert "Reason:     OOMKilled" in lab.svclab("describe", "pod", name, check=True).stdout
    lab.svclab("delete", "pod", name, check=True)


def test_cpu_and_memory_limits_are_in_the_pod_cgroup_and_it_goes_with_the_pod(lab):
    name = f"spin-{suffix()}"
    resources = {"limits": {"cpu": "200m", "memory": "64Mi"}, "requests": {"cpu": "100m"}}
    lab.svclab("apply", "-f", "-", check=True, input=command_pod(name, ["python3", "-c", "while True: pass"], resources))
    uid = wait_pod(lab, name, running)["metadata"]["uid"]
    dirs = pod_cgroup_dirs(lab, uid)
    assert all(naming.cgroup_name(lab.name) == d.parent.name for d in dirs), dirs
    cpu, memory, pids = (next(d for d in dirs if (d / f).exists())
                         for f in ("cpu.cfs_quota_us", "memory.limit_in_bytes", "pids.max"))
    assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "20000"  # 200m of a 100 ms period
    assert (cpu / "cpu.shares").read_text().strip() == "102"  # 100m requested
    assert (memory / "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
    assert (pids / "pids.max").read_text().strip() == str(cgroups.DEFAULT_PIDS_LIMIT)
    assert len(cgroups.processes(cpu)) == 3  # the sandbox, init and the command
    deadline = time.monotonic() + 20  # the spinning command is throttled at 20 % of a cpu
    while "nr_throttled 0" in (stat := (cpu / "cpu.stat").read_text()):
        assert time.monotonic() < deadline, stat
        time.sleep(0.2)
    lab.svclab("delete", "pod", name, check=True)
    deadline = time.monotonic() + 20
    while any(d.exists() for d in dirs):
        assert time.monotonic() < deadline, [d for d in dirs if d.exists()]
        time.sleep(0.1)


def test_down_removes_the_clusters_cgroups(lab):
    name = f"sleeper-{suffix()}"
    lab.svclab("apply", "-f", "-", check=True, input=command_pod(name, ["sleep", "600"], {"limits": {"cpu": "100m"}}))
    uid = wait_pod(lab, name, running)["metadata"]["uid"]
    assert pod_cgroup_dirs(lab, uid)
    down_and_check(lab)
    assert cgroups.find_cluster_groups(lab.name) == []
    assert not any(os.path.exists(d) for d in pod_cgroup_dirs(lab, uid))
