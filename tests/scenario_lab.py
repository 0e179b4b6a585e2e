"""Running `svclab run` as a user does, for the scenario tests: a subprocess with its own state
root and a cluster name of its own, the processes of the cluster's namespaces sampled while it
runs, and after it ends what it left (tests/test_cluster.py's leak check, plus fault state:
nft tables and qdiscs outside the namespaces, cgroups named after the cluster).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import REPO
from tests.test_cluster import cluster_name, cluster_processes, leftovers

SCENARIOS = REPO / "scenarios"
TEST_SCENARIOS = REPO / "tests" / "scenarios"


@dataclass
class Run:
    """One `svclab run` process and what it produced."""

    file: Path
    root: Path
    name: str
    report: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None
    seen: dict[int, tuple[int, str]] = field(default_factory=dict)  # processes of its namespaces
    stdout: str = ""
    stderr: str = ""
    _sampler: threading.Thread | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "testbed", "--state-root", str(self.root), *args]

    def start(self) -> "Run":
        argv = self.command("run", str(self.file), "--name", self.name, "--report", str(self.report), *self.args)
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # the table at its log width
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.5):
            self.seen.update(cluster_processes(self.name))

    def wait(self, timeout: float = 300) -> int:
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        finally:
            self._done.set()
            self._sampler.join(5)
        return self.proc.returncode

    def svclab(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.command("--name", self.name, *args), capture_output=True, text=True, cwd=REPO,
                              timeout=timeout)

    @property
    def state(self) -> Path:
        return self.root / self.name

    def json(self) -> dict:
        return json.loads((self.report / "report.json").read_text())

    def junit(self) -> ET.Element:
        return ET.parse(self.report / "junit.xml").getroot()

    def output(self) -> str:
        return f"exit {self.proc.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr[-6000:]}"

    def left(self) -> list[str]:
        """What of the cluster is still on the machine (empty after a clean teardown)."""
        return leftovers(self.name, self.state, self.seen) + fault_leftovers(self.name)


def fault_leftovers(name: str) -> list[str]:
    """Fault state outside the cluster's namespaces: nft tables and qdiscs of the root namespace
    naming the cluster, cgroups named after it."""
    out = []
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    out += [f"nft {line}" for line in tables.splitlines() if name in line]
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    out += [f"qdisc {line}" for line in qdiscs.splitlines() if f"{name}-" in line]
    for base in Path("/sys/fs/cgroup").glob("*"):
        if base.is_dir():
            out += [f"cgroup {p}" for p in base.glob(f"*{name}*")]
    return out


def scenario_run(tmp_path: Path, file: Path, *args: str, name: str | None = None) -> Run:
    """A Run not started yet (start() it, or use run_to_end)."""
    return Run(Path(file), tmp_path / "state", name or cluster_name(), tmp_path / "report", args)


def run_to_end(tmp_path: Path, file: Path, *args: str, timeout: float = 300) -> Run:
    run = scenario_run(tmp_path, file, *args).start()
    run.wait(timeout)
    return run


def check_report(run: Run) -> dict:
    """report.json, junit.xml and timeline.png written and readable, and saying the same things."""
    report = run.json()
    assert report["schema"] == "svclab.scenario.report/v1", report["schema"]
    junit = run.junit()
    cases = [c for suite in junit.iter("testsuite") for c in suite.iter("testcase") if c.get("name") != "run"]
    assert len(cases) == sum(len(r["assertions"]) for r in report["runs"]), (len(cases), report["runs"])
    failures = [c for c in cases if c.find("failure") is not None]
    assert len(failures) == sum(not a["passed"] for r in report["runs"] for a in r["assertions"])
    png = (run.report / "timeline.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    return report


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text.replace("@SCENARIOS@", str(SCENARIOS)))
    return path
