"""Every kube-proxy backend implements the one written contract, backends.ProxyBackend (as
upstream checks `var _ proxy.Provider = &Proxier{}`): the same methods with the same
parameters, one constructor shape, and no I/O before the first call. Pure: no root, no kernel."""

from __future__ import annotations

import inspect

import pytest

from testbed.proxy import backends
from testbed.proxy.backends import NodeSettings, ProxyBackend

pytestmark = pytest.mark.unit

CONTRACT = [name for name, member in vars(ProxyBackend).items()
            if callable(member) and not name.startswith("_")] + ["__init__"]


def test_the_contract_names_what_kube_proxy_calls():
    assert set(CONTRACT) == {"__init__", "needs_full_sync", "sync", "check", "dump", "cleanup"}


@pytest.mark.parametrize("mode", backends.IMPLEMENTED)
def test_backend_implements_the_contract(mode):
    cls = backends.implementation(mode)
    backend = cls(NodeSettings("node1", "10.244.0.0/16", ("172.18.0.2",), ("172.18.0.2",)))
    assert isinstance(backend, ProxyBackend)
    assert backend.name == mode
    for method in CONTRACT:
        wanted = inspect.signature(getattr(ProxyBackend, method))
        got = inspect.signature(getattr(cls, method))
        assert list(got.parameters) == list(wanted.parameters), f"{cls.__name__}.{method}{got} != {wanted}"
        assert str(got.return_annotation) == str(wanted.return_annotation), f"{cls.__name__}.{method} returns"


def test_every_mode_is_known_and_unknown_modes_are_refused():
    assert set(backends.IMPLEMENTED) <= set(backends.MODES)
    with pytest.raises(backends.Unsupported, match="unknown proxy mode 'userspace'"):
        backends.create("userspace", NodeSettings("node1"))
