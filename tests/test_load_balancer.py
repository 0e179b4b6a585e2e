"""The cloud load balancer end to end: real OVS, real os-ken, real packets from the client namespace.

The cluster, its IP plan and the helpers that read the edge switch back are in tests/lb_lab.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from bench.service_churn import churn
from controller import flows
from testbed.client.client import ApiClient
from testbed.cluster import cloud_lb
from testbed.cluster.processes import ProcessTable
from testbed.paths import StateDir
from tests.conftest import REPO
from tests.lb_lab import (  # noqa: F401  (lab and web are fixtures)
    CLIENT,
    HOLDER,
    NODES,
    POOL,
    apply,
    arp_answer,
    connection_nodes,
    cordon,
    curl,
    delete,
    deployment,
    edge_flows,
    edge_groups,
    external_ip,
    get_json,
    group_id,
    guard_packets,
    lab,
    lb_service,
    load,
    load_records,
    ready_pods,
    set_port,
    switch_backends,
    table,
    tracked_node,
    wait_backends,
    wait_switch,
    web,
)

pytestmark = pytest.mark.cluster


# ---------------------------------------------------------------- tests

def test_external_ip_reachable_and_connections_spread_over_all_nodes(lab, web):
    assert web == POOL[0]
    out = lab.svclab("get", "svc", "web", check=True).stdout
    assert re.search(rf"web\s+LoadBalancer\s+\S+\s+{re.escape(web)}\s+80:\d+/TCP", out), out
    assert "IPAllocated" in lab.svclab("describe", "svc", "web", check=True).stdout
    pods = {p["metadata"]["name"] for p in ready_pods(lab, "web", 3)}
    assert get_json(lab, f"http://{web}/")["pod"] in pods
    node_port = lab.json("svc", "web")["spec"]["ports"][0]["nodePort"]
    # one bucket per healthy node, each committing the connection with DNAT to that node's nodePort
    assert sorted(switch_backends(lab, web)) == sorted((ip, node_port) for ip in NODES.values())
    before = connection_nodes(lab, web)
    requests = load_records(lab, f"http://{web}/", rate=30, duration=1)
    assert len(requests) == 30 and all(r.ok for r in requests), requests
    spread = {n: c - before.get(n, 0) for n, c in connection_nodes(lab, web).items()}
    # the group hashes each connection's addresses and ports, so the spread is that of a hash, not round
    # robin: every one of the 30 went through the group, every node got some (all three at 30: 1 - 1.5e-5)
    assert set(spread) == set(NODES.values()) and sum(spread.values()) == 30 and min(spread.values()) >= 1, spread


def test_client_reaches_no_cluster_ip_and_no_pod_ip(lab, web):
    svc = lab.json("svc", "web")
    pod_ip = ready_pods(lab, "web", 3)[0]["status"]["podIP"]
    for target in (svc["spec"]["clusterIP"], pod_ip):
        assert curl(lab, f"http://{target}/", timeout=1).returncode != 0
    # not even with routes toward the router: ClusterIPs and pod IPs are internal only
    routes = [["ip", "route", "add", net, "via", "203.0.113.1"] for net in ("10.96.0.0/12", "10.244.0.0/16")]
    try:
        for route in routes:
            lab.exec("client", *route)
        for target in (svc["spec"]["clusterIP"], f"{pod_ip}:8080"):
            assert curl(lab, f"http://{target}/", timeout=1).returncode != 0
    finally:
        for route in routes:
            lab.exec("client", "ip", "route", "del", route[3])


def test_pods_and_nodes_reaching_the_external_ip_stay_inside_the_cluster(lab, web):
    """As upstream: kube-proxy has rules for status.loadBalancer.ingress IPs, so a pod or a node
    reaching the external IP is DNATed on its own node and never crosses the load balancer."""
    pods = ready_pods(lab, "web", 3)
    names = {p["metadata"]["name"] for p in pods}
    before = connection_nodes(lab, web)
    for where in (pods[0]["metadata"]["name"], "node2"):
        for _ in range(5):
            r = lab.exec(where, "curl", "-s", "--max-time", "3", f"http://{web}/")
            assert r.returncode == 0 and json.loads(r.stdout)["pod"] in names, r
    assert connection_nodes(lab, web) == before  # no new connection through the switch
    rules = lab.svclab("rules", "node2", check=True).stdout
    assert f"-d {web}/32" in rules and "loadbalancer IP" in rules


def test_second_service_gets_its_own_ip(lab, web):
    apply(lab, lb_service("web2", app="web"))
    try:
        ip2 = external_ip(lab, "web2")
        assert ip2 != web and ip2 in POOL
        wait_backends(lab, ip2, set(NODES.values()))
        assert get_json(lab, f"http://{ip2}/")["pod"].startswith("web-")
        assert get_json(lab, f"http://{web}/")["pod"].startswith("web-")
    finally:
        delete(lab, "svc", "web2")


def test_node_crash_fails_over_and_the_node_comes_back(lab):
    """Every request that starts once the crashed node's bucket is out of the switch's group
    succeeds; how soon that is (goal: within 2 s) is bench/load_balancer.py's measurement."""
    # The Service's pods run on node1 and node2 only, so what is observed is the load
    # balancer's failover (not kube-proxy's, which follows the endpoints).
    cordon(lab, "node3", True)
    try:
        apply(lab, deployment("ha", 2) + "---\n" + lb_service("ha"))
        assert {p["spec"]["nodeName"] for p in ready_pods(lab, "ha", 2)} == {"node1", "node2"}
    finally:
        cordon(lab, "node3", False)
    ip = external_ip(lab, "ha")
    try:
        wait_backends(lab, ip, set(NODES.values()))
        wait_switch(lab, ip, set(NODES.values()))
        before = sum(connection_nodes(lab, ip).values())
        run = load(lab, f"http://{ip}/", rate=20, duration=8)
        deadline = time.monotonic() + 10
        while sum(connection_nodes(lab, ip).values()) < before + 10:  # the load runs through the switch
            assert time.monotonic() < deadline and run.alive(), connection_nodes(lab, ip)
            time.sleep(0.1)
        crash = time.monotonic() - run.t0  # s on the generator's clock
        set_port(lab, "node3", "down")
        wait_backends(lab, ip, {NODES["node1"], NODES["node2"]}, timeout=10)  # out of the table
        wait_switch(lab, ip, {NODES["node1"], NODES["node2"]}, timeout=0.5)  # the switch follows the table
        out_of_group = time.monotonic() - run.t0  # after the switch changed: later requests never meet node3's bucket
        run.wait()
        requests = run.records()
        after = [r for r in requests if r.t >= out_of_group]
        assert len(after) >= 10 and all(r.ok for r in after), [r for r in after if not r.ok]
        earlier = [r for r in requests if r.t < crash]
        assert len(earlier) >= 10 and all(r.ok for r in earlier), [r for r in earlier if not r.ok]
    finally:
        set_port(lab, "node3", "up")
    wait_backends(lab, ip, set(NODES.values()), timeout=10)  # re-added once healthy again
    wait_switch(lab, ip, set(NODES.values()))
    before = connection_nodes(lab, ip)
    requests = load_records(lab, f"http://{ip}/", rate=30, duration=1)
    assert len(requests) == 30 and all(r.ok for r in requests), requests
    after = connection_nodes(lab, ip)
    given = {n: after[n] - before.get(n, 0) for n in after}
    assert sum(given.values()) == 30 and given[NODES["node3"]] >= 1, given  # node3 takes new connections again
    delete(lab, "svc", "ha")
    delete(lab, "deployment", "ha")


def test_local_policy_targets_only_nodes_with_endpoints_and_keeps_the_client_ip(lab):
    apply(lab, deployment("loc", 1) + "---\n" + lb_service("loc", extra="  externalTrafficPolicy: Local\n"))
    try:
        node = ready_pods(lab, "loc", 1)[0]["spec"]["nodeName"]
        ip = external_ip(lab, "loc")
        wait_backends(lab, ip, {NODES[node]})
        answer = get_json(lab, f"http://{ip}/")
        assert answer["client"].split(":")[0] == CLIENT  # not masqueraded anywhere on the way
        wait_switch(lab, ip, {NODES[node]})  # the only bucket: the node with the endpoint
        before = connection_nodes(lab, ip)[NODES[node]]
        requests = load_records(lab, f"http://{ip}/", rate=30, duration=1)
        assert len(requests) == 30 and all(r.ok for r in requests), requests
        assert connection_nodes(lab, ip) == {NODES[node]: before + 30}
    finally:
        delete(lab, "svc", "loc")
        delete(lab, "deployment", "loc")


def test_source_ranges_are_enforced_at_the_load_balancer(lab, web):
    apply(lab, lb_service("ranged", app="web", extra="  loadBalancerSourceRanges: [203.0.113.2/32]\n"))
    lab.exec("client", "ip", "addr", "add", "203.0.113.3/24", "dev", "eth0")
    try:
        ip = external_ip(lab, "ranged")
        wait_backends(lab, ip, set(NODES.values()))
        assert get_json(lab, f"http://{ip}/")["pod"].startswith("web-")
        # only the range's clients enter the tracker; the rest fall to the guard and are dropped in the switch
        into_tracker = [line for line in edge_flows(lab).splitlines() if f"nw_dst={ip}," in line and "ct(table=1" in line]
        assert len(into_tracker) == 1 and "nw_src=203.0.113.2," in into_tracker[0], into_tracker
        guard_before = guard_packets(lab, ip)
        outside = curl(lab, f"http://{ip}/", "--interface", "203.0.113.3", timeout=2)
        assert outside.returncode == 28, outside  # nothing at all comes back: a timeout, not a refusal
        assert guard_packets(lab, ip) > guard_before  # its SYNs (and retransmits) were dropped by the guard
        assert curl(lab, f"http://{web}/", "--interface", "203.0.113.3").returncode == 0  # no ranges there
    finally:
        lab.exec("client", "ip", "addr", "del", "203.0.113.3/24", "dev", "eth0")
        delete(lab, "svc", "ranged")


def test_deleted_service_releases_its_ip_rules_and_arp_answers(lab, web):
    apply(lab, lb_service("gone", app="web"))
    ip = external_ip(lab, "gone")
    wait_backends(lab, ip, set(NODES.values()))
    get_json(lab, f"http://{ip}/")
    assert f"group_id={group_id(ip)}," in edge_groups(lab)
    assert ip in edge_flows(lab) and arp_answer(lab, ip) == "02:00:cb:00:71:" + f"{int(ip.split('.')[-1]):02x}"
    delete(lab, "svc", "gone")
    deadline = time.monotonic() + 5
    while ip in edge_flows(lab) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ip not in edge_flows(lab)
    assert f"group_id={group_id(ip)}," not in edge_groups(lab)
    assert ip not in table(lab)
    assert arp_answer(lab, ip) == ""
    assert curl(lab, f"http://{ip}/", timeout=1).returncode != 0
    apply(lab, lb_service("again", app="web"))  # the released IP is free again (lowest first)
    try:
        assert external_ip(lab, "again") == ip
    finally:
        delete(lab, "svc", "again")


def test_pool_exhausted_requested_ip_and_type_change(lab, web):
    names = [f"fill{i}" for i in range(5)]
    try:
        apply(lab, lb_service("want", app="web", extra=f"  loadBalancerIP: {web}\n"))
        deadline = time.monotonic() + 10
        while "is in use by default/web" not in lab.svclab("describe", "svc", "want").stdout:
            assert time.monotonic() < deadline, lab.svclab("describe", "svc", "want").stdout
            time.sleep(0.1)
        assert "<pending>" in lab.svclab("get", "svc", "want").stdout
        delete(lab, "svc", "want")
        apply(lab, "---\n".join(lb_service(n, app="web") for n in names))
        ips = {}
        for n in names[:4]:
            ips[n] = external_ip(lab, n)
        assert sorted(ips.values()) == sorted(set(POOL) - {web})
        deadline = time.monotonic() + 10
        while "no free IP in the pool 203.0.113.100-203.0.113.104" not in lab.svclab("describe", "svc", "fill4").stdout:
            assert time.monotonic() < deadline, lab.svclab("describe", "svc", "fill4").stdout
            time.sleep(0.1)
        assert re.search(r"fill4\s+LoadBalancer\s+\S+\s+<pending>", lab.svclab("get", "svc").stdout)
        # fill0 stops being a LoadBalancer: its IP is released and goes to the pending Service
        apply(lab, lb_service("fill0", app="web").replace("type: LoadBalancer", "type: NodePort"))
        assert external_ip(lab, "fill4") == ips["fill0"]
        assert "IPAllocated" not in lab.svclab("describe", "svc", "fill0").stdout
        assert ips["fill0"] not in {ip for ip, lb in table(lab).items() if lb.service == "default/fill0"}
    finally:
        delete(lab, "svc", "want", *names)


def test_controller_restart_keeps_established_connections_and_relearns(lab, web):
    holder = subprocess.Popen(
        ["ip", "netns", "exec", f"{lab.name}-client", sys.executable, "-c", HOLDER, web],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        word, *ports = holder.stdout.readline().split()
        assert word == "open"
        nodes = [tracked_node(lab, int(port)) for port in ports]
        groups = edge_groups(lab)
        processes = ProcessTable(lab.state)
        for name in (cloud_lb.LB_CONTROLLER, cloud_lb.CLOUD_CONTROLLER):  # held down by the supervisor
            lab.svclab("stop", name, check=True)
        assert not any(processes.load()[n].alive() for n in (cloud_lb.LB_CONTROLLER, cloud_lb.CLOUD_CONTROLLER))
        # no controller at all: the switch still carries the connection, balances new ones, answers ARP
        holder.stdin.write("a\n")
        assert json.loads(holder.stdout.readline())["pod"].startswith("web-")
        before = sum(connection_nodes(lab, web).values())
        for _ in range(3):
            assert get_json(lab, f"http://{web}/", timeout=3)["pod"].startswith("web-")
        assert sum(connection_nodes(lab, web).values()) - before == 3
        assert arp_answer(lab, web) == flows.virtual_mac(web)
        for name in (cloud_lb.CLOUD_CONTROLLER, cloud_lb.LB_CONTROLLER):
            lab.svclab("start", name, check=True)
        synced = wait_resynced(lab, 2)
        # the restarted app read the rules and the group back from the switch and found nothing to change
        kept_rules, kept_groups, changed = synced[-1]
        assert int(kept_rules) >= 11 and int(kept_groups) >= 1 and changed == "rules +0 -0, groups +0 ~0 -0", synced
        wait_backends(lab, web, set(NODES.values()))
        assert edge_groups(lab) == groups
        # a crash (kill -9) of the app: the supervisor brings it back, and it re-learns the same way
        os.kill(processes.load()[cloud_lb.LB_CONTROLLER].pid, signal.SIGKILL)
        assert wait_resynced(lab, 3)[-1][2] == "rules +0 -0, groups +0 ~0 -0"
        holder.stdin.write("b\n")  # opened before both restarts, used after them
        assert json.loads(holder.stdout.readline())["pod"].startswith("web-")
        assert [tracked_node(lab, int(port)) for port in ports] == nodes  # both kept their node throughout
        assert lab.json("svc", "web")["status"]["loadBalancer"]["ingress"][0]["ip"] == web
        assert get_json(lab, f"http://{web}/")["pod"].startswith("web-")  # new connections too
        apply(lab, lb_service("after", app="web"))  # the pool re-learned web's IP from its status
        assert external_ip(lab, "after") != web
    finally:
        holder.kill()
        delete(lab, "svc", "after")


def wait_resynced(lab, count: int, timeout: float = 30) -> list[tuple[str, str, str]]:
    """The app's sync reports once there are `count` (one per connection to the switch since `up`)."""
    log = lab.state / "logs" / "lb-controller.log"
    pattern = r"switch connected: kept (\d+) rules and (\d+) groups as they were; (rules .*)"
    deadline = time.monotonic() + timeout
    while len(synced := re.findall(pattern, log.read_text())) < count:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    return synced


def test_established_connections_keep_their_node_while_the_group_changes(lab):
    """Local policy, so a connection's pod is on its node: a third node leaving and coming back changes the
    group's buckets under two open connections, which keep their node (the tracker holds their DNAT)."""
    apply(lab, deployment("st", 3) + "---\n" + lb_service("st", extra="  externalTrafficPolicy: Local\n"))
    pods = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in ready_pods(lab, "st", 3)}
    assert sorted(pods.values()) == sorted(NODES), pods
    ip = external_ip(lab, "st")
    holder = None
    try:
        wait_backends(lab, ip, set(NODES.values()))
        wait_switch(lab, ip, set(NODES.values()))
        holder = subprocess.Popen(["ip", "netns", "exec", f"{lab.name}-client", sys.executable, "-c", HOLDER, ip],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        word, *ports = holder.stdout.readline().split()
        assert word == "open"
        held = {k: tracked_node(lab, int(port)) for k, port in zip("ab", ports)}
        other = next(n for n, addr in NODES.items() if addr not in held.values())
        set_port(lab, other, "down")
        try:
            wait_switch(lab, ip, set(NODES.values()) - {NODES[other]})  # out of the group
            holder.stdin.write("a\n")
            assert NODES[pods[json.loads(holder.stdout.readline())["pod"]]] == held["a"]
        finally:
            set_port(lab, other, "up")
        wait_switch(lab, ip, set(NODES.values()), timeout=10)  # back in the group
        holder.stdin.write("b\n")
        assert NODES[pods[json.loads(holder.stdout.readline())["pod"]]] == held["b"]
        assert {k: tracked_node(lab, int(port)) for k, port in zip("ab", ports)} == held
    finally:
        if holder is not None:
            holder.kill()
        delete(lab, "svc", "st")
        delete(lab, "deployment", "st")


def connrate(lab, targets: list[str], clients: int, connections: int) -> dict:
    proc = subprocess.run(["ip", "netns", "exec", f"{lab.name}-client", sys.executable, "-m", "bench.connrate",
                           *targets, "--clients", str(clients), "--connections", str(connections), "--timeout", "3"],
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=True)
    return json.loads(proc.stdout)


def test_new_connections_are_balanced_in_the_switch_at_the_node_port_rate(lab, web):
    """Smoke test of the data path: no connection is punted to the app, and the rate is the NodePort's league."""
    log = lab.state / "logs" / "lb-controller.log"
    packet_ins = log.read_text().count("unexpected packet-in")
    assert "CONTROLLER" not in edge_flows(lab)  # no rule sends anything to the app
    # The baseline: a NodePort Service of its own over the same pods. (Not web's own nodePort: a client
    # that reaches it straight from a source port it just used through the external IP gets its answer
    # taken for that connection's, see docs/load-balancer.md.)
    apply(lab, lb_service("web-np", app="web").replace("type: LoadBalancer", "type: NodePort"))
    try:
        node_port = lab.json("svc", "web-np")["spec"]["ports"][0]["nodePort"]
        straight = [f"{addr}:{node_port}" for addr in NODES.values()]
        get_json(lab, f"http://{straight[0]}/")  # kube-proxy has its rules
        before = sum(connection_nodes(lab, web).values())
        runs = {"node_port": [], "external_ip": []}
        for _ in range(3):  # alternating, so the machine's other load hits both alike
            runs["node_port"].append(connrate(lab, straight, 10, 100))
            runs["external_ip"].append(connrate(lab, [f"{web}:80"], 10, 100))
    finally:
        delete(lab, "svc", "web-np")
    for run in runs["node_port"] + runs["external_ip"]:
        assert run["failed"] == 0 and run["answered"] == 1000, runs
    # every new connection through the external IP went through the group, none through the app
    assert sum(connection_nodes(lab, web).values()) - before == 3000
    assert log.read_text().count("unexpected packet-in") == packet_ins
    # Punting every connection to the app ran at 0.2x (the benchmark's goal is 0.8x). One round is a
    # second or so on a shared 2-core machine, so each path's best round is compared.
    best = {path: max(r["rate"] for r in rs) for path, rs in runs.items()}
    assert best["external_ip"] >= 0.5 * best["node_port"], (best, runs)


def test_unrelated_service_churn_leaves_the_load_balancer_alone(lab, web):
    """5,000 headless ClusterIP Services created and deleted under traffic through the external IP: no
    table change, no health flap, no failed request (it was 24 of 595 for 3,000, issue #10)."""
    feed_lines = (lab.state / "logs" / "lb-controller.log").read_text().count("svclab.lb INFO table:")
    cloud_log = lab.state / "logs" / "cloud-controller.log"
    flaps = cloud_log.read_text().count("unhealthy")
    run = load(lab, f"http://{web}/", rate=20, duration=15)
    time.sleep(1.0)

    async def create_and_delete() -> dict:
        async with ApiClient.for_state_dir(StateDir(lab.state)) as client:
            return await churn(client, 5000)
    phases = asyncio.run(create_and_delete())
    run.wait()
    requests = run.records()
    failed = [r for r in requests if not r.ok]
    assert len(requests) == 300 and not failed, (phases, failed)
    assert cloud_log.read_text().count("unhealthy") == flaps, cloud_log.read_text()[-3000:]
    assert (lab.state / "logs" / "lb-controller.log").read_text().count("svclab.lb INFO table:") == feed_lines
    assert set(table(lab)[web].backends) == set(NODES.values())
    assert lab.json("svc")["items"] and not [s for s in lab.json("svc")["items"]
                                             if s["metadata"]["name"].startswith("unrelated-")]
