"""The svclab CLI as users and graders run it: kubectl habits, kubectl-shaped output."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.unit

SEED = str(REPO / "scenarios/manifests/seed")


def test_apply_get_and_json_of_the_seed_manifests(apiserver):
    r = apiserver.cli("apply", "-f", f"{SEED}/frontend-deployment.yaml", "-f", f"{SEED}/service-nodeport.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["deployment.apps/frontend created", "service/frontend-service created"]

    r = apiserver.cli("get", "svc")
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    row = next(line.split() for line in rows if line.startswith("frontend-service"))
    assert row[1] == "NodePort" and row[3] == "<none>" and row[4] == "80:30007/TCP"

    doc = json.loads(apiserver.cli("get", "services", "-o", "json").stdout)
    assert doc["kind"] == "List" and doc["apiVersion"] == "v1"
    svc = next(i for i in doc["items"] if i["metadata"]["name"] == "frontend-service")
    assert svc["apiVersion"] == "v1" and svc["kind"] == "Service"
    assert svc["spec"]["clusterIP"] == row[2]
    assert svc["spec"]["ports"][0] == {"protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30007}

    one = json.loads(apiserver.cli("get", "svc", "frontend-service", "-o", "json").stdout)
    assert one["kind"] == "Service" and one["metadata"]["resourceVersion"]

    deploy = yaml.safe_load(apiserver.cli("get", "deploy", "frontend", "-o", "yaml").stdout)
    assert deploy["apiVersion"] == "apps/v1" and deploy["spec"]["replicas"] == 3

    r = apiserver.cli("apply", "-f", f"{SEED}/service-nodeport.yaml")
    assert r.stdout.strip() == "service/frontend-service unchanged"
    r = apiserver.cli("apply", "-f", f"{SEED}/service-loadbalancer.yaml")
    assert r.stdout.strip() == "service/frontend-service configured"
    row = next(line.split() for line in apiserver.cli("get", "svc").stdout.splitlines() if line.startswith("frontend"))
    assert row[1] == "LoadBalancer" and row[3] == "<pending>" and row[4] == "80:30007/TCP"


def test_a_file_with_one_bad_document_changes_nothing(apiserver):
    bad = open(f"{SEED}/service-clusterip.yaml").read() + "\n---\n" + """
apiVersion: v1
kind: Service
metadata: {name: broken}
spec:
  type: NodePort
  ports: [{port: 80, nodePort: 40000}]
"""
    r = apiserver.cli("apply", "-f", "-", input=bad)
    assert r.returncode == 1
    assert "spec.ports[0].nodePort: Invalid value: 40000: provided port is not in the valid range. " \
           "The range of valid ports is 30000-32767" in r.stderr
    assert "frontend-service" not in apiserver.cli("get", "svc").stdout


def test_unsupported_kinds_and_unknown_fields(apiserver):
    r = apiserver.cli("apply", "-f", "-", input="apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: x}\n")
    assert r.returncode == 1
    assert 'no matches for kind "Ingress" in version "networking.k8s.io/v1"' in r.stderr
    r = apiserver.cli("apply", "-f", "-", input="apiVersion: v1\nkind: Service\nmetadata: {name: w}\n"
                                                "spec: {ports: [{port: 80}], colour: blue}\n")
    assert r.returncode == 0
    assert 'Warning: STDIN (document 1): unknown field "spec.colour"' in r.stderr
    r = apiserver.cli("apply", "-f", "-", input="apiVersion: v1\nkind: Service\nmetadata: {name: w}\n"
                                                "spec: {ports: [{port: eighty}]}\n")
    assert r.returncode == 1 and "spec.ports[0].port: Invalid value: 'eighty': must be an integer" in r.stderr
    r = apiserver.cli("get", "ingress")
    assert r.returncode == 1 and 'doesn\'t have a resource type "ingress"' in r.stderr


def test_short_names_wide_describe_scale_delete(apiserver):
    apiserver.cli("apply", "-f", f"{SEED}/frontend-deployment.yaml", "-f", f"{SEED}/service-clusterip.yaml")
    for short in ("svc", "deploy", "po", "no", "ep"):
        assert apiserver.cli("get", short).returncode == 0
    wide = apiserver.cli("get", "svc", "-o", "wide").stdout.splitlines()[0].split()
    assert wide[-1] == "SELECTOR"
    wide = apiserver.cli("get", "deploy", "-o", "wide").stdout
    assert "app=frontend" in wide and "nginx" in wide

    text = apiserver.cli("describe", "svc", "frontend-service").stdout
    assert "Name:              frontend-service" in text and "TargetPort:        8080/TCP" in text

    r = apiserver.cli("scale", "deployment", "frontend", "--replicas", "5")
    assert r.stdout.strip() == "deployment.apps/frontend scaled"
    assert json.loads(apiserver.cli("get", "deploy", "frontend", "-o", "json").stdout)["spec"]["replicas"] == 5
    r = apiserver.cli("scale", "svc", "frontend-service", "--replicas", "5")
    assert r.returncode == 1 and "only deployments scale" in r.stderr

    r = apiserver.cli("delete", "svc", "frontend-service")
    assert r.stdout.strip() == 'service "frontend-service" deleted'
    r = apiserver.cli("delete", "svc", "frontend-service")
    assert r.returncode == 1 and "NotFound" in r.stderr
    r = apiserver.cli("delete", "-f", f"{SEED}/frontend-deployment.yaml")
    assert r.stdout.strip() == 'deployment "frontend" deleted'
    assert apiserver.cli("get", "deploy").stderr.strip() == "No resources found in default namespace."


def test_cluster_not_running_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "testbed", "--state-root", str(tmp_path), "--name", "nope", "get", "svc"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert 'cluster "nope" is not running' in r.stderr
    r = subprocess.run([sys.executable, "-m", "testbed", "--name", "Bad_Name", "get", "svc"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid cluster name" in r.stderr


def test_open_vswitch_out_of_reach_is_a_clear_error_that_leaves_nothing(tmp_path):
    """ovs-vsctl looks for its database in OVS_RUNDIR: an empty one is a machine whose Open
    vSwitch is not running. `svclab up` and `svclab run` say so (no traceback) and leave nothing."""
    import os
    import subprocess
    import sys

    (tmp_path / "ovs").mkdir()
    env = {**os.environ, "OVS_RUNDIR": str(tmp_path / "ovs")}
    base = [sys.executable, "-m", "testbed", "--state-root", str(tmp_path / "state")]
    up = subprocess.run([*base, "--name", "noovs", "up", "--nodes", "1"], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=120)
    run = subprocess.run([*base, "--name", "noovs2", "run", str(REPO / "scenarios/node-failure.yaml"),
                          "--report", str(tmp_path / "report")], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    for r, status in ((up, 1), (run, 2)):
        assert r.returncode == status, r.stderr
        assert "Open vSwitch is not running" in r.stderr and "Traceback" not in r.stderr, r.stderr
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [line for line in netns.splitlines() if line.startswith(("noovs-", "noovs2-"))], netns
    r = subprocess.run([*base, "--name", "noovs", "clean"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "nothing" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


def test_kube_proxy_refuses_bad_nodeport_addresses_naming_the_option(tmp_path):
    import subprocess
    import sys

    (tmp_path / "token").write_text("t\n")
    base = [sys.executable, "-m", "testbed", "--state-dir", str(tmp_path), "kube-proxy", "--node-name", "n1"]
    r = subprocess.run([*base, "--nodeport-addresses", "10.0.0.0/8,nope"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--nodeport-addresses" in r.stderr and "'nope' is not a CIDR" in r.stderr
    # a CIDR holding none of the namespace's addresses would leave the node without NodePorts
    # (a fresh namespace: loopback only, whatever this machine's addresses are)
    r = subprocess.run(["unshare", "--net", "--", *base, "--nodeport-addresses", "10.0.0.0/8"], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 2 and "no address of this namespace (none) is inside 10.0.0.0/8" in r.stderr


def test_kube_proxy_cleanup_removes_every_modes_rules_and_only_them(tmp_path):
    """`kube-proxy --cleanup` (upstream's flag; node-crash uses it): in a fresh namespace holding
    rules of both modes and someone else's chain, ours go and theirs stays."""
    import shlex
    import subprocess
    import sys

    from testbed.proxy.iptables.hooks import hook_rules

    hooks = [f"iptables -w -t {r.table} -N {r.args[-1]} 2>/dev/null || true; iptables -w {shlex.join(r.insert_argv())}"
             for r in hook_rules()]  # kube-proxy's jumps into its chains, as a sync leaves them
    script = "\n".join(["set -e", "nft add table ip kube-proxy; nft add chain ip kube-proxy services", *hooks,
                         "iptables -w -t nat -N THEIRS; iptables -w -t nat -A PREROUTING -j THEIRS"]) + f"""
{sys.executable} -m testbed --state-dir {tmp_path} kube-proxy --node-name n1 --cleanup
echo ---; nft list tables; iptables-save -t nat"""
    r = subprocess.run(["unshare", "--net", "--", "sh", "-c", script], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    said, _, after = r.stdout.partition("---")
    assert said.strip() == "removed the rules of: iptables, nftables"
    assert "kube-proxy" not in after and "KUBE-" not in after, after
    assert ":THEIRS" in after and "-A PREROUTING -j THEIRS" in after, after


def test_namespaces_and_all_namespaces(apiserver):
    apiserver.cli("apply", "-n", "team-a", "-f", f"{SEED}/service-clusterip.yaml")
    assert "frontend-service" in apiserver.cli("get", "svc", "-n", "team-a").stdout
    assert "frontend-service" not in apiserver.cli("get", "svc").stdout
    out = apiserver.cli("get", "svc", "-A").stdout.splitlines()
    assert out[0].split()[0] == "NAMESPACE"
    assert any(line.split()[:2] == ["team-a", "frontend-service"] for line in out)


def test_a_verb_imports_only_its_own_module():
    """Each verb's module is imported when it runs (LazySvclabGroup): `svclab get` and the
    components' starts skip the faults' and scenarios' imports; --help still lists every verb."""
    import subprocess
    import sys

    probe = ("import sys; from testbed.cli.main import cli; cli([{args}], standalone_mode=False); "
             "print(sorted(m for m in sys.modules if m.startswith(('testbed.faults', 'testbed.scenario', "
             "'testbed.cli.'))))")
    r = subprocess.run([sys.executable, "-c", probe.format(args="'get', '--help'")], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    loaded = r.stdout.strip().splitlines()[-1]
    assert "testbed.cli.objects" in loaded and "faults" not in loaded and "scenario" not in loaded, loaded
    r = subprocess.run([sys.executable, "-m", "testbed", "--help"], capture_output=True, text=True, cwd=REPO)
    verbs = {line.split()[0] for line in r.stdout.partition("Commands:")[2].splitlines() if line.strip()}
    from testbed.cli.main import VERBS
    assert verbs == set(VERBS) and {"get", "fault", "run", "vm", "kube-proxy"} <= verbs, verbs
