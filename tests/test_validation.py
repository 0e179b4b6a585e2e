"""Every refusal names the field and the reason, as Kubernetes words it, and changes nothing."""

from __future__ import annotations

import json

import pytest

from testbed.api.errors import ApiError
from tests.builders import deployment, obj, service
from tests.conftest import run

pytestmark = pytest.mark.unit

NODE_PORT_RANGE = "provided port is not in the valid range. The range of valid ports is 30000-32767"

SERVICE_CASES = [
    (dict(type="NodePort", ports=[{"port": 80, "nodePort": 40000}]),
     f"spec.ports[0].nodePort: Invalid value: 40000: {NODE_PORT_RANGE}"),
    (dict(ports=[{"port": 0}]), "spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive"),
    (dict(ports=[{"port": 70000}]), "spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535"),
    (dict(ports=[{"port": 80, "protocol": "ICMP"}]),
     'spec.ports[0].protocol: Unsupported value: "ICMP": supported values: "SCTP", "TCP", "UDP"'),
    (dict(type="External"), 'spec.type: Unsupported value: "External"'),
    (dict(ports=[{"port": 80, "nodePort": 30080}]),
     "spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"),
    (dict(ports=[{"port": 80}, {"port": 81}]), "spec.ports[0].name: Required value"),
    (dict(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]), 'spec.ports[1].name: Duplicate value: "a"'),
    (dict(ports=[{"port": 80, "targetPort": "Not_A_Name"}]), 'spec.ports[0].targetPort: Invalid value: "Not_A_Name"'),
    (dict(ports=[{"port": 80, "targetPort": 0}]), "spec.ports[0].targetPort: Invalid value: 0"),
    (dict(clusterIP="10.96.0.300"), 'spec.clusterIPs[0]: Invalid value: "10.96.0.300": must be a valid IP address'),
    (dict(type="NodePort", clusterIP="None"), "spec.clusterIPs[0]: Invalid value: \"None\": may not be set to 'None'"),
    (dict(externalTrafficPolicy="Local"),
     'spec.externalTrafficPolicy: Invalid value: "Local": may only be set for externally-accessible services'),
    (dict(type="NodePort", externalTrafficPolicy="Nearest"), 'spec.externalTrafficPolicy: Unsupported value: "Nearest"'),
    (dict(sessionAffinity="Cookie"), 'spec.sessionAffinity: Unsupported value: "Cookie"'),
    (dict(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds: Invalid value: 0: must be greater than 0"),
    (dict(type="LoadBalancer", loadBalancerSourceRanges=["300.0.0.0/8"]),
     'spec.loadBalancerSourceRanges[0]: Invalid value: "300.0.0.0/8"'),
    (dict(loadBalancerSourceRanges=["10.0.0.0/8"]), "spec.loadBalancerSourceRanges: Forbidden"),
    (dict(externalIPs=["nope"]), 'spec.externalIPs[0]: Invalid value: "nope": must be a valid IP address'),
]


@pytest.mark.parametrize("spec,message", SERVICE_CASES, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(SERVICE_CASES)])
def test_invalid_services_are_refused(apiserver, spec, message):
    async def scenario():
        async with apiserver.client() as c:
            _, before = await c.list("Service")
            ports = spec.pop("ports", None)
            with pytest.raises(ApiError) as err:
                await c.create(service("web", ports=ports, **spec))
            assert err.value.message.startswith('Service "web" is invalid: ')
            assert message in err.value.message
            items, after = await c.list("Service")
            assert after == before and [s.metadata.name for s in items] == ["kubernetes"]
    run(scenario())


def test_space_padded_load_balancer_source_ranges_are_accepted_and_kept_as_given(apiserver):
    """As upstream's validation: each entry is trimmed before the CIDR check (kube-proxy and the
    cloud load balancer trim it too); the object keeps what was written."""
    padded = [" 203.0.113.0/25 ", "\t10.0.0.0/8\n"]

    async def scenario():
        async with apiserver.client() as c:
            created = await c.create(service("web", type="LoadBalancer", loadBalancerSourceRanges=padded))
            assert list(created.spec.load_balancer_source_ranges) == padded
            with pytest.raises(ApiError, match='spec.loadBalancerSourceRanges\\[0\\]: Invalid value: " 10.0.0.0/33 "'):
                await c.create(service("bad", type="LoadBalancer", loadBalancerSourceRanges=[" 10.0.0.0/33 "]))
    run(scenario())


@pytest.mark.parametrize("name", ["Web", "1web", "web_1", "-web", "a" * 64])
def test_service_names_are_dns1035_labels(apiserver, name):
    async def scenario():
        async with apiserver.client() as c:
            with pytest.raises(ApiError, match=f'metadata.name: Invalid value: "{name}": a DNS-1035 label'):
                await c.create(service(name))
    run(scenario())


def test_several_errors_are_reported_together(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            with pytest.raises(ApiError) as err:
                await c.create(service("web", ports=[{"port": 0, "targetPort": 80, "protocol": "ICMP"}]))
            assert err.value.message.startswith('Service "web" is invalid: [')
            assert "spec.ports[0].port" in err.value.message and "spec.ports[0].protocol" in err.value.message
    run(scenario())


def test_deployment_selector_must_match_template(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            d = deployment("web")
            d.spec.template.metadata.labels["app"] = "other"
            with pytest.raises(ApiError, match="spec.template.metadata.labels: Invalid value: .*`selector` does not match template `labels`"):
                await c.create(d)
            d = deployment("web", replicas=-1)
            with pytest.raises(ApiError, match="spec.replicas: Invalid value: -1"):
                await c.create(d)
            d = deployment("web")
            d.spec.template.spec.containers[0].ports[0].container_port = 0
            with pytest.raises(ApiError, match=r"spec.template.spec.containers\[0\].ports\[0\].containerPort: Invalid value: 0"):
                await c.create(d)
            items, _ = await c.list("Deployment")
            assert items == []
    run(scenario())


def test_invalid_pods_and_slices(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            pod = obj({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}})
            with pytest.raises(ApiError, match="spec.containers: Required value"):
                await c.create(pod)
            pod = obj({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [
                {"name": "web", "image": "web", "lifecycle": {"preStop": {"sleep": {"seconds": -1}}}}]}})
            with pytest.raises(ApiError, match=r"spec.containers\[0\].lifecycle.preStop.sleep.seconds: Invalid value: "
                                               r"-1: must be greater than or equal to 0"):
                await c.create(pod)
            eps = obj({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "e"},
                       "addressType": "IPv6", "endpoints": [{"addresses": ["x"]}]})
            with pytest.raises(ApiError) as err:
                await c.create(eps)
            assert 'addressType: Unsupported value: "IPv6"' in err.value.message
            assert 'endpoints[0].addresses[0]: Invalid value: "x"' in err.value.message
    run(scenario())


def test_invalid_update_leaves_the_object_as_it_was(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            created = await c.create(service("web", type="NodePort", ports=[{"port": 80, "nodePort": 30007}]))
            bad = service("web", type="NodePort", ports=[{"port": 80, "nodePort": 40000}])
            with pytest.raises(ApiError, match="spec.ports\\[0\\].nodePort: Invalid value: 40000"):
                await c.update(bad)
            assert await c.get("Service", "web") == created
            # and 30007 is still held by it
            with pytest.raises(ApiError, match="provided port is already allocated"):
                await c.create(service("other", type="NodePort", ports=[{"port": 80, "nodePort": 30007}]))
    run(scenario())


LOOPBACK = "may not be in the loopback range (127.0.0.0/8, ::1/128)"
SPECIAL_ADDRESSES = [
    ("127.0.0.1", LOOPBACK),
    ("127.200.3.4", LOOPBACK),
    ("169.254.169.254", "may not be in the link-local range (169.254.0.0/16, fe80::/10)"),
    ("224.0.0.251", "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"),
    ("0.0.0.0", "may not be unspecified (0.0.0.0)"),
]


@pytest.mark.parametrize("address,detail", SPECIAL_ADDRESSES, ids=[a for a, _ in SPECIAL_ADDRESSES])
def test_endpoint_addresses_kubernetes_refuses(apiserver, address, detail):
    """A slice's address becomes a DNAT target: 127.0.0.1:22 would reach the node's own sshd."""
    async def scenario():
        async with apiserver.client() as c:
            def eps(*addresses):
                return obj({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "e"},
                            "addressType": "IPv4", "ports": [{"port": 22}],
                            "endpoints": [{"addresses": ["10.244.1.5"]}, {"addresses": list(addresses)}]})
            with pytest.raises(ApiError) as err:
                await c.create(eps("10.244.1.6", address))
            assert err.value.message == (f'EndpointSlice "e" is invalid: '
                                         f'endpoints[1].addresses[1]: Invalid value: "{address}": {detail}')
            created = await c.create(eps("10.244.1.6"))
            with pytest.raises(ApiError, match=f"endpoints\\[1\\].addresses\\[0\\]: Invalid value: \"{address}\""):
                await c.update(eps(address))
            assert await c.get("EndpointSlice", "e") == created
    run(scenario())


def test_a_loopback_endpoint_from_a_manifest_is_refused(apiserver):
    r = apiserver.cli("apply", "-f", "-", input="""
apiVersion: v1
kind: Service
metadata: {name: ssh}
spec: {ports: [{port: 22}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ssh-1, labels: {kubernetes.io/service-name: ssh}}
addressType: IPv4
ports: [{port: 22}]
endpoints: [{addresses: [127.0.0.1]}]
""")
    assert r.returncode == 1
    assert r.stderr == ('error: Error from server: EndpointSlice "ssh-1" is invalid: endpoints[0].addresses[0]: '
                        f'Invalid value: "127.0.0.1": {LOOPBACK}\n')
    assert "ssh" not in apiserver.cli("get", "svc").stdout


QUANTITY_FORMAT = "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
RESOURCE_CASES = [
    ({"limits": {"memory": "12XB"}},
     f'spec.containers[0].resources.limits[memory]: Invalid value: "12XB": {QUANTITY_FORMAT}'),
    ({"requests": {"cpu": "fast"}}, f'spec.containers[0].resources.requests[cpu]: Invalid value: "fast": {QUANTITY_FORMAT}'),
    ({"limits": {"cpu": "1Mm"}}, 'spec.containers[0].resources.limits[cpu]: Invalid value: "1Mm": '
                                 "unable to parse quantity's suffix"),
    ({"limits": {"memory": "-1"}}, 'spec.containers[0].resources.limits[memory]: Invalid value: "-1": '
                                   "must be greater than or equal to 0"),
    ({"limits": {"cpu": "500m"}, "requests": {"cpu": "1"}},
     'spec.containers[0].resources.requests: Invalid value: "1": must be less than or equal to cpu limit of 500m'),
    ({"limits": {"memory": "64Mi"}, "requests": {"memory": "1Gi"}},
     'spec.containers[0].resources.requests: Invalid value: "1Gi": must be less than or equal to memory limit of 64Mi'),
    ({"limits": {"gpu": "1"}}, 'spec.containers[0].resources.limits[gpu]: Invalid value: "gpu": '
                               "must be a standard resource for containers"),
]


def resource_pod(resources: dict, kind: str = "Pod"):
    container = {"name": "c", "image": "busybox", "command": ["sleep", "60"], "resources": resources}
    return obj({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [container]}})


@pytest.mark.parametrize("resources, message", RESOURCE_CASES)
def test_resource_quantities_are_validated_as_kubernetes_does(apiserver, resources, message):
    async def scenario():
        async with apiserver.client() as c:
            with pytest.raises(ApiError) as err:
                await c.create(resource_pod(resources))
            assert message in err.value.message
            assert not (await c.list("Pod", "default"))[0]
    run(scenario())


def test_requests_default_to_limits_and_describe_shows_both(apiserver):
    r = apiserver.cli("apply", "-f", "-", input="""
apiVersion: apps/v1
kind: Deployment
metadata: {name: bounded}
spec:
  replicas: 0
  selector: {matchLabels: {app: bounded}}
  template:
    metadata: {labels: {app: bounded}}
    spec:
      containers:
        - name: c
          image: busybox
          command: [sleep, "60"]
          resources: {limits: {cpu: 500m, memory: 128Mi}, requests: {cpu: 0.25}}
---
apiVersion: v1
kind: Pod
metadata: {name: bounded}
spec:
  containers:
    - name: c
      image: busybox
      command: [sleep, "60"]
      resources: {limits: {cpu: 1, memory: 134217728}}
""")
    assert r.returncode == 0, r.stderr
    template = json.loads(apiserver.cli("get", "deploy", "bounded", "-o", "json").stdout)["spec"]["template"]
    assert template["spec"]["containers"][0]["resources"] == {
        "limits": {"cpu": "500m", "memory": "128Mi"}, "requests": {"cpu": "0.25", "memory": "128Mi"}}
    pod = json.loads(apiserver.cli("get", "pod", "bounded", "-o", "json").stdout)
    assert pod["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "1", "memory": "134217728"}
    described = apiserver.cli("describe", "pod", "bounded").stdout
    assert "    Limits:\n      cpu:      1\n      memory:   134217728\n" in described, described
    assert "    Requests:\n      cpu:      1\n" in described
    bad = apiserver.cli("apply", "-f", "-", input=template_with_bad_limit())
    assert bad.returncode == 1
    assert ('spec.template.spec.containers[0].resources.limits[memory]: Invalid value: "lots"' in bad.stderr), bad.stderr


def template_with_bad_limit() -> str:
    return """
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad}
spec:
  selector: {matchLabels: {app: bad}}
  template:
    metadata: {labels: {app: bad}}
    spec: {containers: [{name: c, image: i, resources: {limits: {memory: lots}}}]}
"""
