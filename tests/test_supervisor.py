"""The supervisor with real component processes (API servers on Unix sockets, no root): a
component that exits comes back after a back-off that doubles and starts over after a long
run; `stop` keeps it down until `start`; the control socket refuses bad requests and changes
nothing. The clock of the watch loop is injected (tick(now)): no test sleeps for a back-off.
The end-to-end behaviour in a cluster (kill -9 of each component) is in test_supervision.py."""

from __future__ import annotations

import os
import signal
import time

import pytest

from testbed.cluster.processes import ProcessTable
from testbed.cluster.supervisor import (
    BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET_AFTER, RESTARTING, RUNNING, STOPPED, Supervisor, ask,
    last_known_status,
)

pytestmark = pytest.mark.unit


def make(tmp_path) -> Supervisor:
    state = tmp_path / "state"
    state.mkdir()
    return Supervisor(ProcessTable(state), state)


def good_argv(tmp_path) -> list[str]:
    api_state = tmp_path / "api"
    api_state.mkdir(exist_ok=True)
    return ["apiserver", "--state-dir", str(api_state)]


def bad_argv(tmp_path) -> list[str]:
    return [*good_argv(tmp_path), "--service-cidr", "not-a-cidr"]  # refused at start: exit 2


def exited(sup: Supervisor, name: str, timeout: float = 30) -> None:
    proc = sup._components[name].proc
    assert proc is not None
    proc.wait(timeout)


def status(sup: Supervisor, name: str) -> dict:
    return next(c for c in sup.status() if c["name"] == name)


def test_an_exiting_component_is_restarted_with_a_doubling_back_off(tmp_path):
    sup = make(tmp_path)
    sup.start("apiserver", bad_argv(tmp_path))
    now = time.monotonic()
    waits = []
    for restarts in range(4):
        exited(sup, "apiserver")
        sup.tick(now)
        item = status(sup, "apiserver")
        assert item["state"] == RESTARTING and item["restarts"] == restarts
        assert item["lastExit"] == "exit 2"
        assert any("not-a-cidr" in line for line in item["lastError"]), item["lastError"]
        wait = sup._components["apiserver"].next_start - now
        waits.append(round(wait, 3))
        sup.tick(now + wait - 0.01)  # not yet
        assert status(sup, "apiserver")["state"] == RESTARTING
        now += wait
        sup.tick(now)
        assert status(sup, "apiserver")["state"] == RUNNING
        assert status(sup, "apiserver")["restarts"] == restarts + 1
    assert waits == [BACKOFF_FIRST * 2 ** i for i in range(4)]
    sup._stop(sup._components["apiserver"])


def test_back_off_is_capped_and_starts_over_after_a_long_run(tmp_path):
    sup = make(tmp_path)
    proc = sup.start("apiserver", good_argv(tmp_path))
    component = sup._components["apiserver"]
    component.backoff = BACKOFF_MAX * 4  # as after many quick crashes
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    sup.tick(component.started_mono + 1)  # ran 1 s: the cap holds
    assert component.next_start == pytest.approx(component.started_mono + 1 + BACKOFF_MAX * 4)
    assert status(sup, "apiserver")["lastExit"] == "killed by SIGKILL"
    component.state, component.next_start = RUNNING, None
    component.proc = proc
    component.backoff = BACKOFF_MAX
    sup.tick(component.started_mono + BACKOFF_RESET_AFTER + 1)  # ran long enough: from the start again
    assert component.next_start == pytest.approx(component.started_mono + BACKOFF_RESET_AFTER + 1 + BACKOFF_FIRST)


def test_stop_keeps_it_down_until_start(tmp_path):
    sup = make(tmp_path)
    first = sup.start("apiserver", good_argv(tmp_path)).pid
    answer = sup.handle({"verb": "stop", "component": "apiserver"})
    assert answer["components"][0]["state"] == STOPPED
    assert sup._components["apiserver"].proc is None
    assert not ProcessTable(sup.state_dir).load()["apiserver"].alive()
    sup.tick(time.monotonic() + 3600)  # much later: still down
    assert status(sup, "apiserver")["state"] == STOPPED and status(sup, "apiserver")["pid"] is None
    answer = sup.handle({"verb": "start", "component": "apiserver"})
    second = answer["components"][0]["pid"]
    assert answer["components"][0]["state"] == RUNNING and second not in (None, first)
    assert ProcessTable(sup.state_dir).load()["apiserver"].pid == second  # down/clean find the new pid
    sup._stop(sup._components["apiserver"])


def test_kill_is_a_crash_that_comes_back_or_with_keep_down_stays_down(tmp_path):
    sup = make(tmp_path)
    first = sup.start("apiserver", good_argv(tmp_path)).pid
    answer = sup.handle({"verb": "kill", "component": "apiserver"})
    assert answer["killed"] == {"apiserver": first}
    sup.tick(time.monotonic())  # the watch loop sees the exit: a restart is scheduled, as after any crash
    item = status(sup, "apiserver")
    assert item["state"] == RESTARTING and item["lastExit"] == "killed by SIGKILL"
    sup.tick(time.monotonic() + BACKOFF_FIRST * 2)
    second = status(sup, "apiserver")["pid"]
    assert status(sup, "apiserver")["state"] == RUNNING and status(sup, "apiserver")["restarts"] == 1
    assert second not in (None, first)
    answer = sup.handle({"verb": "kill", "component": "apiserver", "keepDown": True})
    assert answer["killed"] == {"apiserver": second} and answer["components"][0]["state"] == STOPPED
    sup.tick(time.monotonic() + 3600)
    assert status(sup, "apiserver")["state"] == STOPPED and status(sup, "apiserver")["lastExit"] == "killed by SIGKILL"
    assert sup.handle({"verb": "kill", "component": "apiserver"})["killed"] == {"apiserver": None}  # nothing ran
    assert sup.handle({"verb": "start", "component": "apiserver"})["components"][0]["state"] == RUNNING
    sup._stop(sup._components["apiserver"])


def test_control_socket_answers_and_refuses_bad_requests_changing_nothing(tmp_path):
    sup = make(tmp_path)
    pid = sup.start("apiserver", good_argv(tmp_path)).pid
    sup.run_in_background()
    try:
        assert [c["name"] for c in ask(sup.state_dir, {"verb": "status"})["components"]] == ["apiserver"]
        for request, error in [
            ({"verb": "stop", "component": "etcd"}, "unknown component 'etcd'"),
            ({"verb": "stop", "component": "apiserver", "node": "node1"}, "apiserver runs once per cluster"),
            ({"verb": "stop", "component": "kube-proxy", "node": "node9"}, "no node 'node9'"),
            ({"verb": "reboot", "component": "apiserver"}, "unknown verb 'reboot'"),
        ]:
            answer = ask(sup.state_dir, request)
            assert answer["ok"] is False and error in answer["error"], answer
        assert status(sup, "apiserver")["pid"] == pid and status(sup, "apiserver")["state"] == RUNNING
        status_file = (sup.state_dir / "supervisor.json")
        answer = ask(sup.state_dir, {"verb": "restart", "component": "apiserver"})
        assert answer["ok"] and answer["components"][0]["pid"] != pid
        assert str(answer["components"][0]["pid"]) in status_file.read_text()  # written at each change
    finally:
        sup.shutdown()
        sup._stop(sup._components["apiserver"])
    assert not (sup.state_dir / "supervisor.sock").exists()


def test_logs_are_bounded_and_rotated_while_the_component_keeps_writing(tmp_path):
    sup = make(tmp_path)
    sup.log_max_bytes = 64 * 1024
    proc = sup.start("apiserver", good_argv(tmp_path))
    log = sup.processes.logs / "apiserver.log"
    with open(log, "ab") as f:  # as if it had logged a lot
        f.write(b"old line\n" * 20_000)
    assert sup.rotate_logs() == ["apiserver"]
    assert log.stat().st_size < 1024 and (log.parent / "apiserver.log.1").stat().st_size > 64 * 1024
    assert sup.rotate_logs() == []  # under the bound now
    # It goes on writing at the new end (no hole of zeros): its stdout and stderr append.
    for fd in (1, 2):
        assert os.readlink(f"/proc/{proc.pid}/fd/{fd}") == str(log)
        flags = int(next(line.split()[1] for line in open(f"/proc/{proc.pid}/fdinfo/{fd}")
                         if line.startswith("flags:")), 8)
        assert flags & os.O_APPEND
    sup._stop(sup._components["apiserver"])


def test_status_without_a_supervisor_reads_its_last_words_and_the_process_table(tmp_path):
    sup = make(tmp_path)
    proc = sup.start("apiserver", good_argv(tmp_path))
    sup._components["apiserver"].restarts = 3  # as if it had come back three times
    sup._changed()
    try:
        [entry] = last_known_status(sup.state_dir, ProcessTable(sup.state_dir))
        assert set(entry) == set(status(sup, "apiserver"))  # the shape `svclab status` prints
        assert (entry["name"], entry["state"], entry["pid"], entry["restarts"]) == ("apiserver", RUNNING, proc.pid, 3)
    finally:
        sup._stop(sup._components["apiserver"])
    [entry] = last_known_status(sup.state_dir, ProcessTable(sup.state_dir))
    assert (entry["state"], entry["pid"], entry["restarts"]) == (STOPPED, None, 3)
