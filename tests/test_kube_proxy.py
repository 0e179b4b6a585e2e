"""kube-proxy end to end, in iptables and in nftables mode: real rules in every node, real
packets from pods, nodes and the external client.

Each test applies the Services it needs, so every test runs once per mode. The cluster (one
per mode), its IP plan and the helpers that read a node's rules back are in tests/proxy_lab.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.proxy_lab import (  # noqa: F401  (lab is a fixture)
    CLIENT,
    ECHO_CLIENT,
    NEW_CONNECTIONS,
    NODES,
    SEED,
    UDP_CLIENT,
    apply,
    connect,
    counts,
    curl,
    delete,
    force_full_resync,
    frontend_pods,
    full_syncs,
    get_json,
    kernel_objects,
    lab,
    metric_lines,
    node_run,
    programming_count,
    refusals,
    rule_identities,
    rules_of,
    service,
    udp_echo,
    wait_full_syncs,
    wait_ready_pods,
)
from tests.test_cluster import leftovers

pytestmark = pytest.mark.cluster


def test_seed_nodeport_from_the_client_on_every_node(lab):
    apply(lab, (SEED / "service-nodeport.yaml").read_text())
    names = {p["metadata"]["name"] for p in frontend_pods(lab)}
    for node_ip in NODES:
        answer = get_json(lab, "client", f"http://{node_ip}:30007/")
        assert answer["pod"] in names
        # externalTrafficPolicy Cluster: the client's address is masqueraded
        assert not answer["client"].startswith(CLIENT + ":")


def test_cluster_ip_from_pods_and_nodes_and_by_dns_name(lab):
    apply(lab, (SEED / "service-clusterip.yaml").read_text())
    svc = lab.json("svc", "frontend-service")
    pod = frontend_pods(lab)[0]["metadata"]["name"]
    names = {p["metadata"]["name"] for p in frontend_pods(lab)}
    assert get_json(lab, pod, f"http://{svc['spec']['clusterIP']}/")["pod"] in names
    assert get_json(lab, "node2", f"http://{svc['spec']['clusterIP']}/")["pod"] in names
    # the seed article: `curl http://frontend-service` from a pod
    assert get_json(lab, pod, "http://frontend-service/")["pod"] in names
    assert get_json(lab, pod, "http://frontend-service.default.svc.cluster.local/")["pod"] in names
    # ClusterIP is internal only: the client has no way to it
    assert curl(lab, "client", f"http://{svc['spec']['clusterIP']}/", timeout=2).returncode != 0


def test_distribution_over_three_endpoints_is_even(lab):
    apply(lab, (SEED / "service-clusterip.yaml").read_text())
    svc = lab.json("svc", "frontend-service")
    get_json(lab, "node1", f"http://{svc['spec']['clusterIP']}/")
    seen = counts(lab, "node1", f"http://{svc['spec']['clusterIP']}/", 300)
    assert not [k for k in seen if k.startswith("error")], seen
    assert len(seen) == 3, seen
    expected = 100
    chi2 = sum((c - expected) ** 2 / expected for c in seen.values())
    assert chi2 < 13.82, (seen, chi2)  # chi-square, 2 degrees of freedom, p = 0.001


def test_service_without_endpoints_refuses_at_once(lab):
    """The node's own REJECT: ECONNREFUSED (ICMP port unreachable from the node). Without that
    rule the packet goes on to the router, which answers net unreachable (ENETUNREACH)."""
    apply(lab, service("nobody", "  selector: {app: nobody}\n  ports: [{port: 80, targetPort: 8080}]\n"))
    ip = lab.json("svc", "nobody")["spec"]["clusterIP"]
    deadline = time.monotonic() + 10  # rules follow the API within min-sync-period
    while (answer := connect(lab, 1, ip, 80)) != "ECONNREFUSED":
        assert time.monotonic() < deadline, answer
        time.sleep(0.1)
    if lab.mode == "iptables":  # and it is the REJECT rule of this Service that answered
        def rejected() -> int:
            lines = [l for l in node_run(lab, 1, "iptables-save", "-c", "-t", "filter").splitlines()
                     if '"default/nobody has no endpoints"' in l and "-j REJECT" in l]
            assert len(lines) == 1, lines
            return int(lines[0][1:].split(":")[0])
        before = rejected()
        assert connect(lab, 1, ip, 80) == "ECONNREFUSED"
        assert rejected() > before
    else:  # and it is this Service's no-endpoints element that sends it to the reject chain
        listing = node_run(lab, 1, "nft", "list", "map", "ip", "kube-proxy", "no-endpoint-services")
        assert f'{ip} . tcp . 80 comment "default/nobody" : goto reject-chain' in listing, listing
    delete(lab, "svc", "nobody")


def test_external_traffic_policy_local_keeps_the_client_address(lab):
    apply(lab, service("local", "  type: NodePort\n  externalTrafficPolicy: Local\n  selector: {app: frontend}\n"
                                "  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]\n"))
    pods = frontend_pods(lab)
    with_pods = {p["spec"]["nodeName"] for p in pods}
    node_ips = {f"node{i + 1}": ip for i, ip in enumerate(NODES)}
    for node in with_pods:
        answer = get_json(lab, "client", f"http://{node_ips[node]}:30080/")
        assert answer["client"].split(":")[0] == CLIENT  # not masqueraded
        assert answer["node"] == node  # only local endpoints
    lab.svclab("scale", "deployment", "frontend", "--replicas", "1", check=True)
    try:
        deadline = time.monotonic() + 20
        while len({p["spec"]["nodeName"] for p in frontend_pods(lab)}) > 1 and time.monotonic() < deadline:
            time.sleep(0.3)
        only = frontend_pods(lab)[0]["spec"]["nodeName"]
        other = next(n for n in node_ips if n != only)
        deadline = time.monotonic() + 10
        while (r := curl(lab, "client", f"http://{node_ips[other]}:30080/", timeout=2)).returncode == 0:
            assert time.monotonic() < deadline  # served until that node's rules follow the scale-down
            time.sleep(0.2)
        assert r.returncode == 28  # dropped (no local endpoint): a timeout, not a refusal
        assert get_json(lab, "client", f"http://{node_ips[only]}:30080/")["node"] == only
    finally:
        lab.svclab("scale", "deployment", "frontend", "--replicas", "3", check=True)
        delete(lab, "svc", "local")
        wait_ready_pods(lab, 3)


def test_session_affinity_client_ip(lab):
    apply(lab, service("sticky", "  selector: {app: frontend}\n  sessionAffinity: ClientIP\n"
                                 "  ports: [{port: 80, targetPort: 8080}]\n"))
    ip = lab.json("svc", "sticky")["spec"]["clusterIP"]
    get_json(lab, "node3", f"http://{ip}/")
    seen = counts(lab, "node3", f"http://{ip}/", 30)
    assert not [k for k in seen if k.startswith("error")], seen  # 30 errors are not one endpoint
    assert len(seen) == 1 and sum(seen.values()) == 30, seen
    delete(lab, "svc", "sticky")


def test_hairpin_a_pod_reaches_itself_through_its_service(lab):
    apply(lab, (SEED / "service-clusterip.yaml").read_text())
    ip = lab.json("svc", "frontend-service")["spec"]["clusterIP"]
    pod = frontend_pods(lab)[0]
    name = pod["metadata"]["name"]
    seen = counts(lab, name, f"http://{ip}/", 30)
    assert seen.get(name, 0) > 0, seen  # some answers came from the pod itself
    answer = None
    for _ in range(60):
        answer = get_json(lab, name, f"http://{ip}/")
        if answer["pod"] == name:
            break
    assert answer["pod"] == name
    assert answer["client"].split(":")[0] != pod["status"]["podIP"]  # hairpin traffic is masqueraded


def test_udp_service(lab):
    udp_echo(lab, "udp", "echo")
    ip = lab.json("svc", "echo")["spec"]["clusterIP"]
    probe = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(2);"
             "s.sendto(b'hi',(sys.argv[1],53000)); print(s.recv(4096).decode())")
    deadline = time.monotonic() + 20
    while True:
        r = lab.exec("node1", sys.executable, "-c", probe, ip)
        if r.returncode == 0:
            break
        assert time.monotonic() < deadline, r.stderr
        time.sleep(0.3)
    assert json.loads(r.stdout)["pod"].startswith("udp-")
    delete(lab, "deploy", "udp")
    delete(lab, "svc", "echo")


def test_rules_show_upstream_chains_annotated(lab):
    apply(lab, (SEED / "service-nodeport.yaml").read_text())
    deadline = time.monotonic() + 10
    while "default/frontend-service" not in (r := lab.svclab("rules", "node1", check=True)).stdout:
        assert time.monotonic() < deadline, r.stdout  # node1's rules follow the API within min-sync-period
        time.sleep(0.2)
    if lab.mode == "iptables":
        assert "-A KUBE-SERVICES" in r.stdout and ":KUBE-NODEPORTS" in r.stdout
        svc_lines = [l for l in r.stdout.splitlines() if l.startswith(":KUBE-SVC-")]
        assert any(l.endswith("# default/frontend-service") for l in svc_lines), svc_lines
        assert "--probability 0.3333333" in r.stdout  # random balancing over 3 endpoints
        assert "KUBE-MARK-MASQ" in r.stdout and "0x4000" in r.stdout
    else:
        assert "table ip kube-proxy" in r.stdout and "default/frontend-service/tcp/" in r.stdout
        assert "numgen random mod 3" in r.stdout and "0x00004000" in r.stdout
        assert "-A KUBE-SERVICES" not in r.stdout  # no iptables rules in nftables mode


def test_deleted_pod_leaves_the_rules_of_every_node(lab):
    apply(lab, (SEED / "service-clusterip.yaml").read_text())
    wait_ready_pods(lab, 3)
    victim = frontend_pods(lab)[0]
    ip = victim["status"]["podIP"]
    deadline = time.monotonic() + 10
    while missing := [n for n in (1, 2, 3) if f"{ip}:8080" not in rules_of(lab, n)]:
        assert time.monotonic() < deadline, f"{ip}:8080 never in the rules of nodes {missing}"
        time.sleep(0.2)
    before = {n: programming_count(lab, n) for n in (1, 2, 3)}
    lab.svclab("delete", "pod", victim["metadata"]["name"], check=True)
    deadline = time.monotonic() + 10
    while remaining := [n for n in (1, 2, 3) if f"{ip}:8080" in rules_of(lab, n)]:
        assert time.monotonic() < deadline, f"{ip}:8080 still in the rules of nodes {remaining}"
        time.sleep(0.2)
    for node in (1, 2, 3):  # each node measured how long its rules took to follow this change
        assert programming_count(lab, node) > before[node], (node, before[node])
    wait_ready_pods(lab, 3)


def test_a_service_whose_rules_fail_is_reported_and_does_not_block_the_others(lab):
    """svclab.io/fault: invalid-rules gives a Service one rule the kernel refuses: kube-proxy
    leaves that Service out, says so (log, metrics), applies every other change, tries it again
    at each full resync (not at partial syncs), and at once when it changes."""
    broken = service("broken", "  selector: {app: frontend}\n  ports: [{port: 80, targetPort: 8080}]\n")
    broken = broken.replace("metadata: {name: broken}", "metadata: {name: broken, annotations: {svclab.io/fault: invalid-rules}}")
    try:
        _broken_service_is_left_out_and_retried(lab, broken)
    finally:  # whatever failed, the next tests get a cluster without the broken Service
        for name in ("broken", "healthy", "later"):
            lab.svclab("delete", "svc", name, "--ignore-not-found")


def _broken_service_is_left_out_and_retried(lab, broken: str) -> None:
    apply(lab, broken)
    apply(lab, service("healthy", "  selector: {app: frontend}\n  ports: [{port: 80, targetPort: 8080}]\n"))
    healthy, bad = (lab.json("svc", n)["spec"]["clusterIP"] for n in ("healthy", "broken"))
    names = {p["metadata"]["name"] for p in frontend_pods(lab)}
    for node in (1, 2, 3):
        assert get_json(lab, f"node{node}", f"http://{healthy}/")["pod"] in names  # created with it: works
        deadline = time.monotonic() + 10
        while metric_lines(lab, node, "kubeproxy_services_failed_to_sync ") != ["kubeproxy_services_failed_to_sync 1.0"]:
            assert time.monotonic() < deadline, metric_lines(lab, node, "kubeproxy_services_failed_to_sync")
            time.sleep(0.2)
        assert metric_lines(lab, node, "svclab_kubeproxy_service_rules_failed{") == [
            'svclab_kubeproxy_service_rules_failed{service="default/broken"} 1.0']
        assert curl(lab, f"node{node}", f"http://{bad}/", timeout=1).returncode != 0  # left out: no rules
    log = (lab.state / "logs" / "kube-proxy-node1.log").read_text()
    assert "service default/broken: the kernel refused its rules" in log and "svclab-fault-no-such-chain" in log
    # the broken Service stays out while other changes keep landing, and partial syncs leave it be
    # (a full sync may come by itself meanwhile: the periodic one, or one after a failed write;
    # each tries it once, so tries are counted against full syncs)
    tried, fulls = refusals(lab, 1, "default/broken"), full_syncs(lab, 1)
    apply(lab, service("later", "  selector: {app: frontend}\n  ports: [{port: 81, targetPort: 8080}]\n"))
    later = lab.json("svc", "later")["spec"]["clusterIP"]
    assert get_json(lab, "node1", f"http://{later}:81/")["pod"] in names
    tries_match_full_syncs(lab, tried, fulls)
    # each full resync tries it again
    for _ in range(2):
        tried, syncs = refusals(lab, 1, "default/broken"), full_syncs(lab, 1)
        force_full_resync(lab, 1)
        wait_full_syncs(lab, 1, syncs + 1)
        tries_match_full_syncs(lab, tried, syncs)
        assert refusals(lab, 1, "default/broken") > tried
        assert metric_lines(lab, 1, "kubeproxy_services_failed_to_sync ") == ["kubeproxy_services_failed_to_sync 1.0"]
    tried = refusals(lab, 1, "default/broken")
    if lab.mode == "iptables":
        # the chain its rule jumps to appears (an empty one returns): the next full resync,
        # trying it again, finds its rules accepted and serves it
        node_run(lab, 1, "iptables", "-w", "-t", "nat", "-N", "svclab-fault-no-such-chain")
        try:
            syncs = full_syncs(lab, 1)
            force_full_resync(lab, 1)
            wait_full_syncs(lab, 1, syncs + 1)
            assert get_json(lab, "node1", f"http://{bad}/")["pod"] in names
            assert metric_lines(lab, 1, "kubeproxy_services_failed_to_sync ") == ["kubeproxy_services_failed_to_sync 0.0"]
            assert refusals(lab, 1, "default/broken") == tried
        finally:
            apply(lab, service("broken", "  selector: {app: frontend}\n  ports: [{port: 80, targetPort: 8080}]\n"))
            deadline = time.monotonic() + 10  # once the fault rule is gone, nothing jumps to the chain
            while subprocess.run(["ip", "netns", "exec", f"{lab.name}-node1", "iptables", "-w", "-t", "nat", "-X",
                                  "svclab-fault-no-such-chain"], capture_output=True).returncode != 0:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    # fixed (annotation gone): tried again at once, served, no longer reported
    apply(lab, service("broken", "  selector: {app: frontend}\n  ports: [{port: 80, targetPort: 8080}]\n"))
    assert get_json(lab, "node3", f"http://{bad}/")["pod"] in names
    assert metric_lines(lab, 3, "kubeproxy_services_failed_to_sync ") == ["kubeproxy_services_failed_to_sync 0.0"]
    assert metric_lines(lab, 3, "svclab_kubeproxy_service_rules_failed{") == []


def tries_match_full_syncs(lab, tried: int, fulls: float, timeout: float = 5) -> None:
    """node1's kube-proxy tried the broken Service once per full sync since (tried, fulls) and
    never in a partial one. (A try is logged before its sync is counted: poll briefly.)"""
    deadline = time.monotonic() + timeout
    while (refusals(lab, 1, "default/broken") - tried) != full_syncs(lab, 1) - fulls:
        assert time.monotonic() < deadline, (refusals(lab, 1, "default/broken") - tried, full_syncs(lab, 1) - fulls)
        time.sleep(0.2)


def test_rules_flushed_or_deleted_behind_kube_proxys_back_are_repaired_by_its_monitor(lab):
    """Each kind of damage, with no API change to prompt a sync: kube-proxy's monitor notices
    (it asks every second) and resyncs in full; the Service is served again. Timed from the
    damage to the rules back, by polling the node's tables: the monitor's second plus a sync,
    not the 60 s periodic resync (the deadline leaves room for a loaded machine). kube-proxy is
    frozen while the damage is done and checked, and the clock starts when it thaws."""
    apply(lab, (SEED / "service-clusterip.yaml").read_text())
    ip = lab.json("svc", "frontend-service")["spec"]["clusterIP"]
    get_json(lab, "node2", f"http://{ip}/")
    if lab.mode == "iptables":
        damages = [["iptables", "-w", "-t", "nat", "-F"],  # every nat rule (the canary chain stays, empty)
                   ["iptables", "-w", "-t", "nat", "-F", "KUBE-MARK-MASQ"],  # one chain's rules
                   ["iptables", "-w", "-t", "filter", "-X", "KUBE-PROXY-CANARY"]]  # a canary deleted

        def intact() -> bool:
            nat = node_run(lab, 2, "iptables-save", "-t", "nat")
            return (f"-d {ip}/32" in nat and "-A KUBE-MARK-MASQ -j MARK" in nat
                    and ":KUBE-PROXY-CANARY" in node_run(lab, 2, "iptables-save", "-t", "filter"))
    else:
        damages = [["nft", "flush", "table", "ip", "kube-proxy"],
                   ["nft", "delete", "table", "ip", "kube-proxy"],
                   ["nft", "flush", "chain", "ip", "kube-proxy", "mark-for-masquerade"]]

        def intact() -> bool:
            r = subprocess.run(["ip", "netns", "exec", f"{lab.name}-node2", "nft", "list", "table", "ip", "kube-proxy"],
                               capture_output=True, text=True)
            return r.returncode == 0 and f"{ip} . tcp . 80 : goto" in r.stdout and "meta mark | 0x00004000" in r.stdout
    log = lab.state / "logs" / "kube-proxy-node2.log"
    kube_proxy = json.loads((lab.state / "processes.json").read_text())["kube-proxy-node2"]["pid"]
    assert intact()
    for damage in damages:
        noticed = log.read_text().count("resyncing in full")
        syncs = full_syncs(lab, 2)
        os.kill(kube_proxy, signal.SIGSTOP)  # so that checking the damage cannot race its repair
        try:
            node_run(lab, 2, *damage)
            assert not intact(), damage
        finally:
            os.kill(kube_proxy, signal.SIGCONT)
        damaged = time.monotonic()
        while not intact():
            assert time.monotonic() - damaged < 5, (damage, "not repaired")
            time.sleep(0.02)
        repaired = time.monotonic() - damaged
        assert log.read_text().count("resyncing in full") > noticed, damage  # the monitor saw it
        assert full_syncs(lab, 2) == syncs + 1, damage  # one full resync repaired it
        assert get_json(lab, "node2", f"http://{ip}/")
        print(f"{lab.mode}: {' '.join(damage)}: repaired in {repaired:.2f} s")


def test_pre_stop_sleep_keeps_a_deleted_pod_serving_while_the_rules_let_go(lab):
    """lifecycle.preStop.sleep: the deleted pod is terminating (Services send new connections
    to the ready pod only) but still answers for that long, then goes."""
    pods = [f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: drain}}}}
spec:
  containers: [{{name: web, image: web, ports: [{{containerPort: 8080}}], lifecycle: {{preStop: {{sleep: {{seconds: 6}}}}}}}}]
""" for name in ("drain", "stay")]
    apply(lab, "---\n".join(pods))
    apply(lab, service("drain", "  selector: {app: drain}\n  ports: [{port: 80, targetPort: 8080}]\n"))
    ip = lab.json("svc", "drain")["spec"]["clusterIP"]
    deadline = time.monotonic() + 20
    while set(counts(lab, "node1", f"http://{ip}/", 20)) != {"drain", "stay"}:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    pod_ip = lab.json("pod", "drain")["status"]["podIP"]
    deleted = time.monotonic()  # just before: the API's delete comes after this
    lab.svclab("delete", "pod", "drain", check=True)
    deadline = deleted + 6
    while (seen := counts(lab, "node1", f"http://{ip}/", 20)) != {"stay": 20}:  # the rules let go of it
        assert time.monotonic() < deadline, seen
        time.sleep(0.1)
    answer = curl(lab, "node1", f"http://{pod_ip}:8080/", timeout=2)
    assert answer.returncode == 0 and json.loads(answer.stdout)["pod"] == "drain"  # still serving, as preStop asks
    assert lab.json("pod", "drain")["metadata"]["deletionTimestamp"]  # ... while terminating: within its preStop
    deadline = deleted + 20
    while lab.svclab("get", "pod", "drain").returncode == 0:  # then gone, after its 6 s
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert time.monotonic() - deleted >= 6
    lab.svclab("delete", "pod", "stay", check=True)
    delete(lab, "svc", "drain")


def test_metrics_and_healthz(lab):
    r = lab.exec("node1", "curl", "-s", "--max-time", "3", f"http://{NODES[0]}:10249/metrics")
    assert "kubeproxy_sync_proxy_rules_duration_seconds_count" in r.stdout
    table = "nat" if lab.mode == "iptables" else "kube-proxy"
    assert f'kubeproxy_sync_proxy_rules_iptables_total{{table="{table}"}}' in r.stdout
    r = lab.exec("node1", "curl", "-s", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://{NODES[0]}:10249/healthz")
    assert r.stdout == "200"


def test_health_check_node_port_for_local_load_balancers(lab):
    apply(lab, service("lbl", "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  selector: {app: frontend}\n"
                              "  ports: [{port: 80, targetPort: 8080}]\n"))
    svc = lab.json("svc", "lbl")
    port = svc["spec"]["healthCheckNodePort"]
    with_pods = {p["spec"]["nodeName"] for p in frontend_pods(lab)}
    for i, ip in enumerate(NODES):
        node = f"node{i + 1}"
        deadline = time.monotonic() + 10
        while True:
            r = lab.exec("client", "curl", "-s", "--max-time", "3", "-w", "\\n%{http_code}", f"http://{ip}:{port}/")
            body, _, code = r.stdout.rpartition("\n")
            if code in ("200", "503"):
                break
            assert time.monotonic() < deadline, r
            time.sleep(0.2)
        assert code == ("200" if node in with_pods else "503")
        doc = json.loads(body)
        assert doc["service"] == {"namespace": "default", "name": "lbl"}
        assert (doc["localEndpoints"] > 0) == (node in with_pods)
    delete(lab, "svc", "lbl")


@pytest.mark.skipif(Path("/proc/net/ip_vs").exists(), reason="this kernel has IPVS: nothing to refuse")
def test_ipvs_mode_is_refused_with_the_way_out(tmp_path):
    """On a kernel without IPVS, `up --proxy-mode ipvs` names the command that runs the very same
    thing in the stock-kernel VM, and makes nothing."""
    argv = ["--state-root", str(tmp_path), "--name", "ipvup", "up", "--proxy-mode", "ipvs"]
    r = subprocess.run([sys.executable, "-m", "testbed", *argv], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1
    assert "this kernel has no IPVS" in r.stderr
    assert f"svclab vm -- svclab {' '.join(argv)}" in r.stderr, r.stderr
    assert "--proxy-mode iptables or nftables" in r.stderr
    assert not leftovers("ipvup")


def test_kube_proxy_kill_9_and_restart_keeps_connections_and_converges(lab, tmp_path):
    """kube-proxy on node1 is killed with -9; its supervisor starts it again. Across that: new
    connections are served all along, an established one survives, ClientIP affinity holds, the
    rules are not replaced (iptables: the built-in chains' jumps keep their counters; nftables:
    table, chains and sets keep their handles), the restarted one syncs in full once and then
    leaves unchanged rules alone, and nothing is duplicated."""
    from testbed.cluster.processes import ProcessTable

    apply(lab, """
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
        - {name: echo, image: socat, command: [socat, "TCP-LISTEN:7000,fork,reuseaddr", "EXEC:cat"],
           ports: [{containerPort: 7000}]}
""")
    apply(lab, service("echo", "  type: NodePort\n  selector: {app: echo}\n  ports: [{port: 7000, targetPort: 7000, nodePort: 30700}]\n"))
    apply(lab, (SEED / "service-nodeport.yaml").read_text())
    apply(lab, service("sticky", "  selector: {app: frontend}\n  sessionAffinity: ClientIP\n"
                                 "  ports: [{port: 80, targetPort: 8080}]\n"))
    wait_ready_pods(lab, 3)
    sticky = lab.json("svc", "sticky")["spec"]["clusterIP"]
    deadline = time.monotonic() + 30
    while not any(e["conditions"].get("ready") for s in lab.json("endpointslices", "-l", "kubernetes.io/service-name=echo")["items"]
                  for e in s.get("endpoints", [])):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    get_json(lab, "client", f"http://{NODES[0]}:30007/")
    deadline = time.monotonic() + 10
    while len(seen := counts(lab, "node1", f"http://{sticky}/", 10)) != 1 or any(k.startswith("error") for k in seen):
        assert time.monotonic() < deadline, seen  # node1's rules have the sticky Service
        time.sleep(0.2)
    pinned = next(iter(seen))
    flag, load_flag = tmp_path / "flag", tmp_path / "load"
    flag.write_text("")
    client = subprocess.Popen(
        ["ip", "netns", "exec", f"{lab.name}-client", sys.executable, "-c", ECHO_CLIENT, NODES[0], "30700", str(flag)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    load = subprocess.Popen(
        ["ip", "netns", "exec", f"{lab.name}-client", sys.executable, "-c", NEW_CONNECTIONS,
         f"http://{NODES[0]}:30007/", str(load_flag)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while flag.read_text() != "connected" or not load_flag.exists():
            assert time.monotonic() < deadline and client.poll() is None and load.poll() is None, \
                (client.communicate(), load.communicate())
            time.sleep(0.05)
        before = kernel_objects(lab, 1)
        table = ProcessTable(lab.state)
        old = table.load()["kube-proxy-node1"]
        os.kill(old.pid, signal.SIGKILL)  # supervision starts it again, as `svclab up` started it
        deadline = time.monotonic() + 20
        while True:  # the supervisor started it again, and the new one synced
            new = table.load()["kube-proxy-node1"]
            r = subprocess.run(["ip", "netns", "exec", f"{lab.name}-node1", "curl", "-s", "--max-time", "2",
                                f"http://{NODES[0]}:10249/healthz"], capture_output=True, text=True)
            if new.pid != old.pid and new.alive() and r.returncode == 0 and '"lastUpdated": "2' in r.stdout:
                break
            assert time.monotonic() < deadline, (new, r)
            time.sleep(0.1)
        time.sleep(0.5)  # new connections keep coming through the restarted one's rules for a while
        load_flag.write_text("stop")
        served = json.loads(load.communicate(timeout=30)[0])
        flag.write_text("go")
        out, err = client.communicate(timeout=30)
    finally:
        for proc in (client, load):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert out.split() == ["before", "after"], (out, err)  # the established connection survived
    assert not served["failed"] and served["ok"] >= 10, served  # new connections, all served, all along
    after = kernel_objects(lab, 1)
    if lab.mode == "iptables":
        assert after["chains"] == before["chains"]
        assert set(after["hooks"]) == set(before["hooks"]), (before["hooks"], after["hooks"])
        assert all(after["hooks"][h] >= n for h, n in before["hooks"].items()), (before["hooks"], after["hooks"])
    else:  # nothing replaced; what went is the chains of Services deleted before the restart
        replaced = {k: (h, after["handles"][k]) for k, h in before["handles"].items()
                    if k in after["handles"] and after["handles"][k] != h}
        assert not replaced and set(after["handles"]) <= set(before["handles"]), (before["handles"], after["handles"])
        live = {f"{s['metadata']['namespace']}/{s['metadata']['name']}" for s in lab.json("svc", "-A")["items"]}
        gone = [name for kind, name in set(before["handles"]) - set(after["handles"])]
        owners = [re.match(r"^[a-z]+-[A-Z2-7]{8}-([^/]+/[^/]+)/", name) for name in gone]  # <kind>-<hash>-ns/name/...
        assert all(m and m[1] not in live for m in owners), (gone, live)
    assert counts(lab, "node1", f"http://{sticky}/", 20) == {pinned: 20}  # affinity held across the restart
    assert full_syncs(lab, 1) == 1  # the restarted one: its first sync, and no other
    # later syncs leave unchanged rules alone: frontend-service's rules keep their identity
    frontend = rule_identities(lab, 1, "default/frontend-service")
    assert frontend
    get_json(lab, "node1", f"http://{NODES[0]}:30007/")
    apply(lab, service("unrelated", "  selector: {app: frontend}\n  ports: [{port: 82, targetPort: 8080}]\n"))
    get_json(lab, "node1", f"http://{lab.json('svc', 'unrelated')['spec']['clusterIP']}:82/")
    later = rule_identities(lab, 1, "default/frontend-service")
    assert set(later) == set(frontend)
    if lab.mode == "iptables":
        assert any(n > 0 for n in frontend.values()), frontend  # counted traffic: a reset would show
    assert all(later[r] >= n for r, n in frontend.items()) if lab.mode == "iptables" else later == frontend
    assert full_syncs(lab, 1) == 1
    # converged: every jump from a built-in chain exactly once, no duplicate rules
    if lab.mode == "iptables":
        saved = node_run(lab, 1, "iptables-save")
        rules = [l for l in saved.splitlines() if l.startswith("-A ")]
        dupes = {r for r in rules if rules.count(r) > 1}
        assert not dupes, dupes
        assert sum(1 for r in rules if r.startswith("-A PREROUTING") and "KUBE-SERVICES" in r) == 1
    else:
        listing = node_run(lab, 1, "nft", "list", "ruleset")
        assert listing.count("table ip kube-proxy {") == 1
        chains = listing.split("\tchain ")[1:]
        for chain in chains:
            rules = [l.strip() for l in chain.splitlines()[1:] if l.startswith("\t\t") and "type " not in l]
            assert len(rules) == len(set(rules)), chain
        assert sum(1 for c in chains if c.startswith("nat-prerouting {")) == 1
    for kind, name in (("deploy", "echo"), ("svc", "echo"), ("svc", "sticky"), ("svc", "unrelated")):
        delete(lab, kind, name)


def test_api_server_unreachable_nodes_keep_their_rules_and_resync(lab):
    """The API server is away: every node keeps its rules and keeps serving; when it is back, the
    kube-proxies pick up what changed meanwhile. (`svclab stop` keeps it down: one killed with
    -9 would be back within a second, started again by the cluster's supervisor.)"""
    from testbed.cluster.processes import ProcessTable

    apply(lab, (SEED / "service-nodeport.yaml").read_text())
    names = {p["metadata"]["name"] for p in frontend_pods(lab)}
    get_json(lab, "client", f"http://{NODES[1]}:30007/")
    table = ProcessTable(lab.state)
    lab.svclab("stop", "apiserver", check=True)  # down until started: supervision would bring it back
    try:
        assert lab.svclab("get", "svc").returncode != 0  # it is really gone
        ends = time.monotonic() + 4
        while time.monotonic() < ends:  # a few seconds without an API: rules stay, traffic flows
            for node_ip in NODES:
                assert curl(lab, "client", f"http://{node_ip}:30007/").returncode == 0
            time.sleep(0.3)
        for i in range(3):
            assert table.load()[f"kube-proxy-node{i + 1}"].alive()
            r = lab.exec(f"node{i + 1}", "curl", "-s", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}",
                         f"http://{NODES[i]}:10249/healthz")
            assert r.stdout == "200"  # nothing is pending: healthy
    finally:  # back, as `svclab up` started it: same state directory, same store
        lab.svclab("start", "apiserver", check=True)
    deadline = time.monotonic() + 20
    while lab.svclab("get", "svc").returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    apply(lab, service("after", "  type: NodePort\n  selector: {app: frontend}\n"
                                "  ports: [{port: 80, targetPort: 8080, nodePort: 30081}]\n"))
    for node_ip in NODES:  # the informers reconnected and every node synced the new Service
        assert get_json(lab, "client", f"http://{node_ip}:30081/")["pod"] in names
    delete(lab, "svc", "after")


def test_udp_flows_toward_a_removed_endpoint_are_deleted(lab, tmp_path):
    """A UDP client keeps one socket (one conntrack entry) while its endpoint goes away: kube-proxy
    deletes the entry, so its next datagram reaches another endpoint instead of a dead one."""
    udp_echo(lab, "udp2", "echo2")
    deadline = time.monotonic() + 30
    while len(ready := [a for s in lab.json("endpointslices", "-l", "kubernetes.io/service-name=echo2")["items"]
                        for e in s.get("endpoints", []) if e["conditions"].get("ready") for a in e["addresses"]]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    while missing := [a for a in ready if f"{a}:9000" not in rules_of(lab, 1)]:  # node1 sends to both
        assert time.monotonic() < deadline, missing
        time.sleep(0.2)
    ip = lab.json("svc", "echo2")["spec"]["clusterIP"]
    flag = tmp_path / "first"
    client = subprocess.Popen(
        [sys.executable, "-m", "testbed", "--state-root", str(lab.root), "--name", lab.name, "exec", "node1", "--",
         sys.executable, "-c", UDP_CLIENT, ip, str(flag)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 20
        while not flag.exists() or not flag.read_text():
            assert time.monotonic() < deadline and client.poll() is None, client.communicate()
            time.sleep(0.05)
        first = flag.read_text()
        lab.svclab("delete", "pod", first, check=True)
        out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
    lines = out.split("\n")
    assert lines[0] == f"first {first}" and lines[1].startswith("then udp2-"), (out, err)
    delete(lab, "deploy", "udp2")
    delete(lab, "svc", "echo2")
