"""Size limits on writes: batches fit gRPC's message limit, big objects and annotations are refused by name."""

from __future__ import annotations

import asyncio

import pytest

from testbed.api.errors import ApiError
from tests.builders import deployment, obj
from tests.conftest import run

pytestmark = pytest.mark.unit

ANNOTATIONS_TOO_LONG = "metadata.annotations: Too long: must have at most 262144 bytes"


def pod(name: str, annotations: dict[str, str] | None = None, command: list[str] | None = None):
    container = {"name": "c", "image": "x", **({"command": command} if command else {})}
    return obj({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "annotations": annotations or {}},
                "spec": {"containers": [container]}})


def test_a_burst_of_large_creates_is_sent_in_batches_that_fit(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            pods = [pod(f"p{i}", {"note": "x" * 10_240}) for i in range(600)]
            results = await asyncio.gather(*(c.create(p) for p in pods), return_exceptions=True)
            assert [r for r in results if isinstance(r, BaseException)] == []
            items, _ = await c.list("Pod")
            assert sorted(p.metadata.name for p in items) == sorted(f"p{i}" for i in range(600))
            assert all(len(p.metadata.annotations["note"]) == 10_240 for p in items)
    run(scenario())


def test_an_object_over_the_limit_is_refused_with_its_name(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            huge = pod("huge", command=["x" * (4 * 1024 * 1024)])
            results = await asyncio.gather(c.create(huge), c.create(pod("small")), return_exceptions=True)
            assert isinstance(results[0], ApiError), results[0]
            assert results[0].message == 'Pod "huge": Request entity too large: limit is 3145728'
            assert results[1].metadata.name == "small"  # written in the same burst, unharmed
            items, _ = await c.list("Pod")
            assert [p.metadata.name for p in items] == ["small"]
            # just under the limit is fine
            await c.create(pod("big", command=["x" * (3 * 1024 * 1024 - 200)]))
    run(scenario())


def test_an_apply_over_the_limit_changes_nothing(apiserver, tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n---\n"
                    "apiVersion: v1\nkind: Pod\nmetadata: {name: huge}\n"
                    f"spec: {{containers: [{{name: c, image: x, command: [{'x' * (4 * 1024 * 1024)}]}}]}}\n")
    r = apiserver.cli("apply", "-f", str(path))
    assert r.returncode == 1
    assert r.stderr == 'error: Error from server: Pod "huge": Request entity too large: limit is 3145728\n'
    assert apiserver.cli("get", "svc", "-o", "name").stdout.split() == ["service/kubernetes"]


def test_annotations_are_limited_to_256_kib_in_total(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            at_limit = {"a": "x" * (262_144 - 1 - 4), "bcde": ""}  # keys count too
            created = await c.create(pod("at-limit", at_limit))
            assert created.metadata.annotations == at_limit
            with pytest.raises(ApiError) as err:
                await c.create(pod("over", {"a": "x" * 131_072, "b": "é" * 65_536}))  # bytes, not characters
            assert err.value.message == f'Pod "over" is invalid: {ANNOTATIONS_TOO_LONG}'
            grown = created
            grown.metadata.annotations["f"] = "g"
            with pytest.raises(ApiError, match=ANNOTATIONS_TOO_LONG):
                await c.update(grown)
            d = deployment("web")
            d.spec.template.metadata.annotations["big"] = "x" * 262_144
            with pytest.raises(ApiError) as err:
                await c.create(d)
            assert err.value.message == ('Deployment "web" is invalid: '
                                         "spec.template.annotations: Too long: must have at most 262144 bytes")
            items, _ = await c.list("Pod")
            assert [p.metadata.name for p in items] == ["at-limit"]
            assert (await c.get("Pod", "at-limit")).metadata.annotations == at_limit
    run(scenario())
