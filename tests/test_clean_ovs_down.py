"""svclab clean while Open vSwitch does not answer: the bridges it could not delete are named,
the command fails, and the state is kept for a later clean (it used to log a warning, remove the
state and report success, leaving the bridges behind)."""

from __future__ import annotations

import pytest

from testbed.cluster import netclean

pytestmark = pytest.mark.unit


def test_bridges_ovs_cannot_delete_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("OVS_RUNDIR", str(tmp_path))  # no db.sock there: ovs-vsctl cannot connect
    result = netclean.CleanResult()
    netclean._delete_bridges(["zzqq-nodes", "zzqq-edge"], result)
    assert result.bridges == [] and set(result.bridges_left) == {"zzqq-nodes", "zzqq-edge"}
    assert "db.sock" in result.bridges_left["zzqq-nodes"] or "connect" in result.bridges_left["zzqq-nodes"]
