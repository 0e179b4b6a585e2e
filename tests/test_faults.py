"""Fault injection on one live 3-node cluster (module scope), each action proven by real packets
or real process state, and its undo proven too: partitions both ways and one-way (also what the
load balancer sends to a cut-off node), loss and bandwidth measured, dns-error seen by a pod's
DNS query, flush-rules repaired by kube-proxy, component kills, pod kills with restartCount,
link down/up/flap, node freeze and crash. The last test tears the cluster down with faults in
force and finds nothing left.

IP plan (topo.py): node1 172.18.0.2, node2 .3, node3 .4, client 203.0.113.2; frontend-service
NodePort 30007; frontend-lb gets 203.0.113.100 from the load balancer.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest
from click.testing import CliRunner

from testbed import faults, naming
from testbed.cli.main import cli
from testbed.cluster import procfs
from testbed.cluster.supervisor import ask
from testbed.faults.target import FaultTarget
from testbed.paths import StateDir
from testbed.proxy import nfnetlink
from tests.conftest import REPO
from tests.fault_traffic import connect, dns_rcode, echo_server, echoes, http_get, outcome, transfer_seconds, \
    udp_delivered
from tests.netns import inside
from tests.test_cluster import LabCluster, cluster_name, cluster_processes, leftovers
from tests.test_supervision import wait_for

pytestmark = pytest.mark.cluster

SEED = REPO / "scenarios/manifests/seed"
IP = {"node1": "172.18.0.2", "node2": "172.18.0.3", "node3": "172.18.0.4", "client": "203.0.113.2"}
EXTRA = """apiVersion: v1
kind: Service
metadata: {name: frontend-lb}
spec: {type: LoadBalancer, selector: {app: frontend}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: cmd-always}
spec:
  containers: [{name: web, image: python, command: [python3, -m, http.server, "8081"], ports: [{containerPort: 8081}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: cmd-never}
spec:
  restartPolicy: Never
  containers: [{name: sleeper, image: busybox, command: [sleep, "600"]}]
"""
DNS_NAME = "frontend-service.default.svc.cluster.local"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    cluster = LabCluster(tmp_path_factory.mktemp("faults") / "state", cluster_name())
    conf = tmp_path_factory.mktemp("faultsconf")
    (conf / "lab.yaml").write_text(f"name: {cluster.name}\nnodes: 3\nkubeProxy: {{minSyncPeriod: 100ms}}\n"
                                   "nodeMonitorGracePeriod: 4s\n")
    (conf / "extra.yaml").write_text(EXTRA)
    try:
        cluster.up("--config", str(conf / "lab.yaml"), "-f", str(SEED / "frontend-deployment.yaml"),
                   "-f", str(SEED / "service-nodeport.yaml"), "-f", str(conf / "extra.yaml"))
        wait_for("the load balancer's address", lambda: http_get(netns(cluster, "client"), "203.0.113.100"))
        yield cluster
    finally:
        if (cluster.state / "logs").is_dir():  # for a failure's post-mortem: down removes the state
            shutil.copytree(cluster.state / "logs", conf / "logs", dirs_exist_ok=True)
        cluster.svclab("down", timeout=120)
        assert not leftovers(cluster.name, cluster.state), leftovers(cluster.name, cluster.state)


def target(lab: LabCluster) -> FaultTarget:
    return FaultTarget(lab.name, StateDir(lab.state))


def netns(lab: LabCluster, host: str) -> str:
    return naming.node_netns(lab.name, host)


def pod(lab: LabCluster, name: str) -> dict:
    return lab.json("pods", name)


def pod_when(lab: LabCluster, name: str, what: str, check, timeout: float = 15.0) -> dict:
    """The pod once check(pod) holds."""
    def found():
        item = pod(lab, name)
        return item if check(item) else None
    return wait_for(f"{name}: {what}", found, timeout=timeout, interval=0.2)


def pods_on(lab: LabCluster, label: str, namespace: str = "default") -> list[dict]:
    return lab.json("pods", "-n", namespace, "-l", label)["items"]


def pod_netns(lab: LabCluster, item: dict) -> str:
    return naming.pod_netns(lab.name, item["metadata"]["uid"])


def components(lab: LabCluster) -> dict[str, dict]:
    return {c["name"]: c for c in ask(lab.state, {"verb": "status"})["components"]}


def restarts(item: dict) -> int:
    return sum(c.get("restartCount", 0) for c in item["status"].get("containerStatuses", []))


def ready(item: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in item["status"].get("conditions", []))


def dropped(lab: LabCluster, host: str) -> int:
    """Packets the host's fault rules counted (partition chains)."""
    out = subprocess.run(["ip", "netns", "exec", netns(lab, host), "nft", "list", "table", "inet",
                          f"{lab.name}-fault"], capture_output=True, text=True).stdout
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))


def lb_answers(lab: LabCluster, count: int, timeout: float = 0.5) -> list[str | None]:
    return [http_get(netns(lab, "client"), "203.0.113.100", 80, timeout) for _ in range(count)]


def test_bad_arguments_are_refused_naming_the_field_and_change_nothing(lab):
    before = components(lab)
    runner = CliRunner()
    cases = [
        (["loss", "node9", "30"], "target: unknown host 'node9'"),
        (["loss", "node1", "0"], "percent: must be a number above 0"),
        (["bandwidth", "client", "fast"], "rate: invalid bandwidth 'fast'"),
        (["partition", "client"], "groups: needs at least two groups"),
        (["partition", "client", "node1,client"], "groups[1][1]: client is in two groups"),
        (["partition", "client", "node1", "node2", "--direction", "one-way"], "groups: a one-way partition takes"),
        (["dns-error", "a b"], "names: needs a name glob"),
        (["dns-error", "x", "--rcode", "REFUSED"], "rcode: unknown rcode 'REFUSED'"),
        (["component-kill", "etcd"], "component: unknown component 'etcd'"),
        (["component-stop", "apiserver", "--node", "node1"], "node: apiserver runs once per cluster"),
        (["node-crash", "node7"], "node: unknown node 'node7'"),
        (["pod-kill", "nosuchpod"], 'pod: pod "nosuchpod" not found'),
        (["link-flap", "node1", "--count", "0"], "count: must be a whole number"),
        (["heal", "f99"], "ids[0]: no active fault 'f99'"),
    ]
    if not faults.netem_available():
        cases.append((["delay", "node1", "100ms"], "delay: delay and jitter need a kernel with sch_netem"))
    for args, message in cases:
        result = runner.invoke(cli, ["--state-root", str(lab.root), "--name", lab.name, "fault", *args])
        assert result.exit_code == 1 and message in result.output, (args, result.output)
    assert faults.list_faults(target(lab)) == [] and faults.leftovers(target(lab)) == []
    after = components(lab)
    assert {n: c["pid"] for n, c in after.items()} == {n: c["pid"] for n, c in before.items()}


def test_partition_both_ways_cuts_new_established_and_load_balanced_connections(lab):
    client, node2 = netns(lab, "client"), netns(lab, "node2")
    with echo_server(node2), echo_server(client):
        held = connect(client, IP["node2"])
        assert echoes(held)
        fault = faults.partition(target(lab), [["client"], ["node2"]])
        assert fault.id and faults.list_faults(target(lab))[0].kind == "partition"
        assert not echoes(held)  # established connections too
        held.close()
        assert outcome(client, IP["node2"]) == "timeout" and outcome(node2, IP["client"]) == "timeout"
        assert http_get(client, IP["node1"], 30007)  # the client's other paths are untouched
        assert outcome(netns(lab, "node1"), IP["node2"]) == "ok"
        answers = lb_answers(lab, 20)  # the load balancer sends ~1/3 of new connections to node2
        assert None in answers and any(answers), answers
        assert dropped(lab, "node2") >= answers.count(None)  # dropped at node2: it sees the client's address
        assert [f.id for f in faults.heal(target(lab))] == [fault.id]
        assert outcome(client, IP["node2"]) == "ok" and outcome(node2, IP["client"]) == "ok"
    assert all(lb_answers(lab, 10, timeout=2)) and faults.leftovers(target(lab)) == []


def test_one_way_partition_stops_only_what_the_first_group_sends(lab):
    client, node2 = netns(lab, "client"), netns(lab, "node2")
    with echo_server(node2), echo_server(client):
        held = connect(client, IP["node2"])
        faults.partition(target(lab), [["client"], ["node2"]], direction="one-way", mode="reject")
        started = time.monotonic()
        assert outcome(client, IP["node2"], timeout=2) == "refused" and time.monotonic() - started < 1
        assert not echoes(held)  # the client cannot send on its own connection either
        held.close()
        assert outcome(node2, IP["client"]) == "ok"  # node2's connections work: the client's replies pass
        faults.heal(target(lab))
        faults.partition(target(lab), [["node2"], ["client"]], direction="one-way", mode="drop")
        assert outcome(node2, IP["client"]) == "timeout"
        assert outcome(client, IP["node2"]) == "ok"
        faults.heal(target(lab))
        assert outcome(node2, IP["client"]) == "ok"
    assert faults.leftovers(target(lab)) == []


def test_loss_drops_about_the_percentage_each_way_until_healed(lab):
    client, node1 = netns(lab, "client"), netns(lab, "node1")
    faults.loss(target(lab), "node1", 10)
    faults.loss(target(lab), "node1", 30)  # replaces the first
    assert [f.params["percent"] for f in faults.list_faults(target(lab))] == [30.0]
    arrived_in = udp_delivered(client, node1, IP["node1"])
    arrived_out = udp_delivered(node1, client, IP["client"])
    for arrived in (arrived_in, arrived_out):
        assert 0.15 <= 1 - arrived / 200 <= 0.45, (arrived_in, arrived_out)
    faults.heal(target(lab))
    assert udp_delivered(client, node1, IP["node1"]) >= 198 and udp_delivered(node1, client, IP["client"]) >= 198


def test_bandwidth_limits_tcp_both_ways_until_healed(lab):
    client, node1 = netns(lab, "client"), netns(lab, "node1")
    size = 250_000  # 2 Mbit: 2 s at 1 Mbit/s
    assert transfer_seconds(client, node1, IP["node1"], size) < 1.0
    faults.bandwidth(target(lab), "node1", "1mbit")
    upload = transfer_seconds(client, node1, IP["node1"], size)
    download = transfer_seconds(node1, client, IP["client"], size)
    assert 1.6 <= upload <= 8 and 1.6 <= download <= 8, (upload, download)
    faults.heal(target(lab))
    assert transfer_seconds(node1, client, IP["client"], size) < 1.0 and faults.leftovers(target(lab)) == []


def steadily(check, times: int = 6) -> bool:
    """check() holds several times in a row (both DNS servers answer alike)."""
    return all(check() for _ in range(times))


def test_dns_error_answers_servfail_or_nxdomain_to_a_pod_until_healed(lab):
    web = pod_netns(lab, pods_on(lab, "app=frontend")[0])
    rcode, addresses = dns_rcode(web, DNS_NAME)
    assert rcode == "NOERROR" and addresses
    faults.dns_error(target(lab), "frontend-*")
    wait_for("SERVFAIL", lambda: steadily(lambda: dns_rcode(web, DNS_NAME)[0] == "SERVFAIL"))
    assert dns_rcode(web, "kubernetes.default.svc.cluster.local")[0] == "NOERROR"
    faults.dns_error(target(lab), "kubernetes", rcode="NXDOMAIN")
    wait_for("NXDOMAIN", lambda: steadily(lambda: dns_rcode(web, "kubernetes.default.svc.cluster.local")[0]
                                          == "NXDOMAIN"))
    assert len(faults.heal(target(lab))) == 2
    wait_for("answers again", lambda: steadily(lambda: dns_rcode(web, DNS_NAME) == (rcode, addresses)))


def test_flush_rules_empties_the_nat_table_and_kube_proxy_repairs_it(lab):
    started = time.monotonic()
    faults.flush_rules(target(lab), "node1")
    assert time.monotonic() - started < 1  # it does not wait for the repair
    with inside(netns(lab, "node1")):
        assert nfnetlink.chain_rule_count("nat", "KUBE-SERVICES") == 0
    with inside(netns(lab, "node1")):
        wait_for("the repair", lambda: nfnetlink.chain_rule_count("nat", "KUBE-SERVICES") > 0, timeout=5)
    assert wait_for("the NodePort", lambda: http_get(netns(lab, "client"), IP["node1"], 30007), timeout=5)


def test_component_kill_comes_back_with_a_new_pid_and_serves(lab):
    old = components(lab)["kube-proxy-node1"]["pid"]
    fault = faults.component_kill(target(lab), "kube-proxy", node="node1")
    assert fault.params["killed"] == {"kube-proxy-node1": old}
    wait_for("a new kube-proxy", lambda: components(lab)["kube-proxy-node1"]["pid"] not in (None, old))
    assert wait_for("the NodePort on node1", lambda: http_get(netns(lab, "client"), IP["node1"], 30007), timeout=10)
    faults.component_kill(target(lab), "apiserver")
    assert wait_for("the API server", lambda: components(lab)["apiserver"]["restarts"] >= 1
                    and lab.svclab("get", "nodes").returncode == 0)
    faults.component_kill(target(lab), "coredns")
    wait_for("coredns restarted", lambda: all(restarts(p) >= 1 and ready(p) for p in pods_on(lab, "k8s-app=kube-dns", "kube-system")))
    web = pod_netns(lab, pods_on(lab, "app=frontend")[0])
    answers: list = []
    try:
        wait_for("DNS answers", lambda: answers.append(dns_rcode(web, DNS_NAME)) or answers[-1][0] == "NOERROR")
    except AssertionError:
        raise AssertionError(f"no DNS answer: {answers[-3:]}") from None


def test_component_stop_keeps_it_down_until_start(lab):
    faults.component_stop(target(lab), "kube-proxy", node="node2")
    assert [f.kind for f in faults.list_faults(target(lab))] == ["component-stop"]
    deadline = time.monotonic() + 1.0  # longer than the supervisor's first back-off
    while time.monotonic() < deadline:
        assert components(lab)["kube-proxy-node2"]["state"] == "STOPPED"
        time.sleep(0.1)
    assert len(faults.component_start(target(lab), "kube-proxy", node="node2")) == 1
    assert components(lab)["kube-proxy-node2"]["state"] == "RUNNING" and faults.list_faults(target(lab)) == []


def test_pod_kill_restarts_containers_per_restart_policy_and_counts_restarts(lab):
    web = pods_on(lab, "app=frontend")[0]
    name, ip, node = web["metadata"]["name"], web["status"]["podIP"], web["spec"]["nodeName"]
    killed = faults.pod_kill(target(lab), name)
    assert killed.params["containers"] == ["web"]
    after = pod_when(lab, name, "restarted", lambda p: restarts(p) == 1 and ready(p))
    assert after["status"]["podIP"] == ip
    assert after["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 137
    assert wait_for("it serves", lambda: http_get(netns(lab, node), ip, 8080))

    cmd = pod_when(lab, "cmd-always", "ready", ready)
    inode = procfs.ns_inode(naming.netns_path(pod_netns(lab, cmd)))
    init = procfs.sandbox_init(inode)  # PID 1 of the pod's sandbox, by its pid here
    first = faults.pod_kill(target(lab), "cmd-always").params["pids"]
    assert first[0] == init and len(first) >= 2, first  # the init, then the command inside
    after = pod_when(lab, "cmd-always", "restarted", lambda p: restarts(p) == 1 and ready(p), timeout=20)
    assert after["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 137
    assert set(procfs.processes_in_netns({inode})).isdisjoint(first)
    assert procfs.sandbox_init(inode) not in (None, init)  # a new sandbox in the same pod
    assert wait_for("it serves", lambda: http_get(netns(lab, cmd["spec"]["nodeName"]), cmd["status"]["podIP"], 8081))

    faults.pod_kill(target(lab), "cmd-never")
    never = pod_when(lab, "cmd-never", "Failed", lambda p: p["status"]["phase"] == "Failed")
    assert restarts(never) == 0


def test_link_down_up_and_flap_keep_the_hosts_routes(lab):
    node3, client = netns(lab, "node3"), netns(lab, "client")

    def routes(ns: str) -> str:
        return subprocess.run(["ip", "netns", "exec", ns, "ip", "route"], capture_output=True, text=True).stdout

    before = routes(node3)
    faults.link_down(target(lab), "node3")
    assert "state DOWN" in subprocess.run(["ip", "netns", "exec", node3, "ip", "link", "show", "eth0"],
                                          capture_output=True, text=True).stdout
    assert http_get(client, IP["node3"], 30007) is None
    assert len(faults.link_up(target(lab), "node3")) == 1
    assert routes(node3) == before
    assert wait_for("node3 serves", lambda: http_get(client, IP["node3"], 30007))
    client_routes = routes(client)
    started = time.monotonic()
    faults.link_flap(target(lab), "client", count=2, interval="300ms", wait=True)
    assert 1.1 <= time.monotonic() - started < 5
    assert routes(client) == client_routes and faults.list_faults(target(lab)) == []
    assert http_get(client, IP["node1"], 30007)


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith("State:"))


def test_node_freeze_stops_and_thaw_continues_its_processes(lab):
    kubelet = components(lab)["kubelet-node3"]["pid"]
    fault = faults.node_freeze(target(lab), "node3")
    assert process_state(kubelet) == "T" and [kubelet, None] != fault.undo["pids"][0]
    assert len(faults.node_thaw(target(lab), "node3")) == 1
    assert process_state(kubelet) != "T" and faults.list_faults(target(lab)) == []


def node_ready(lab: LabCluster, node: str) -> bool:
    return ready(lab.json("nodes", node))


def endpoints_on(lab: LabCluster, node: str) -> list[bool]:
    slices = lab.json("endpointslices", "-l", "kubernetes.io/service-name=frontend-service")["items"]
    return [e.get("conditions", {}).get("ready", False) for s in slices for e in s.get("endpoints", [])
            if e.get("nodeName") == node]


def test_node_crash_takes_the_node_out_and_recover_brings_it_back(lab):
    node = pods_on(lab, "app=frontend")[0]["spec"]["nodeName"]
    serving = endpoints_on(lab, node)
    assert serving and all(serving)

    def in_node(*argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", netns(lab, node), *argv], capture_output=True, text=True).stdout

    assert http_get(netns(lab, "client"), IP[node], 30007)  # a tracked connection, in TIME_WAIT
    assert in_node("conntrack", "-L", "-p", "tcp", "--orig-port-dst", "30007").strip()
    fault = faults.node_crash(target(lab), node)
    states = components(lab)
    assert states[f"kubelet-{node}"]["state"] == states[f"kube-proxy-{node}"]["state"] == "STOPPED"
    assert http_get(netns(lab, "client"), IP[node], 30007, timeout=0.5) is None  # links down
    # a power cut takes the kernel's state with it: kube-proxy starts from empty tables on recover
    assert "KUBE-" not in in_node("iptables-save") and "kube-proxy" not in in_node("nft", "list", "tables")
    assert not in_node("conntrack", "-L", "-p", "tcp", "--orig-port-dst", "30007").strip()
    assert fault.params["kernelState"] == "iptables/nftables rules and conntrack entries gone", fault.params
    wait_for(f"{node} NotReady", lambda: not node_ready(lab, node), timeout=15, interval=0.5)
    wait_for("its pods leave the endpoints", lambda: not any(endpoints_on(lab, node)), timeout=10, interval=0.5)
    assert [f.kind for f in faults.node_recover(target(lab), node)] == ["node-crash"]
    wait_for(f"{node} Ready", lambda: node_ready(lab, node), timeout=15, interval=0.5)
    wait_for("its endpoints back", lambda: endpoints_on(lab, node) == serving, timeout=15, interval=0.5)
    assert wait_for(f"{node} serves", lambda: http_get(netns(lab, "client"), IP[node], 30007), timeout=10)


def test_down_removes_every_fault_state(lab):
    t = target(lab)
    faults.partition(t, [["client"], ["node1"]], mode="reject")
    faults.loss(t, "node2", 20)
    faults.bandwidth(t, "client", "10mbit")
    faults.dns_error(t, "frontend-*")
    frozen = faults.node_freeze(t, "node3").undo["pids"]
    assert len(faults.leftovers(t)) >= 4  # tables and qdiscs are there
    processes = cluster_processes(lab.name)
    started = time.monotonic()
    lab.svclab("down", timeout=120)
    assert time.monotonic() - started < 30  # frozen processes were continued, not waited for
    assert not leftovers(lab.name, lab.state, processes)
    assert all(procfs.starttime(pid) != started for pid, started in frozen)  # the frozen processes are gone
