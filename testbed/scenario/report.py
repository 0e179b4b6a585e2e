"""A scenario run's report: report.json, junit.xml and timeline.png in one directory.

report.json holds everything (every request and action with its time, the assertions with
their measured values, the cluster config, svclab's version, the seed; the schema is in
docs/scenario-report.md). junit.xml has one test case per assertion (per proxy mode) for
CI systems and graders. timeline.png is drawn by plot.py.
"""

from __future__ import annotations

import datetime
import json
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from testbed.scenario.assertions import AssertionResult
from testbed.scenario.records import Record
from testbed.scenario.traffic import GeneratorSpec, GeneratorSummary

SCHEMA = "svclab.scenario.report/v1"


def svclab_version() -> str:
    try:
        return metadata.version("svclab")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ActionRecord:
    """One timeline action as it was taken."""

    name: str
    action: str  # node-crash, scale, ...
    t: float  # s after t0 when it was taken
    params: dict = field(default_factory=dict)  # as the scenario gave them, resolved (node, replicas, ...)
    ok: bool = True
    error: str = ""  # why it failed, when it did
    took_s: float = 0.0  # how long taking it took (the call, not its effects)


@dataclass(frozen=True)
class GeneratorResult:
    spec: GeneratorSpec
    summary: GeneratorSummary | None  # None: the probe wrote none (it was killed)
    records: list[Record]


@dataclass(frozen=True)
class RunResult:
    """One run of the scenario (one proxy mode)."""

    mode: str
    cluster: dict  # the cluster config the run used (as `svclab up --config` takes it)
    t0_wall: float  # time.time() at t0
    duration: float  # s
    generators: list[GeneratorResult]
    actions: list[ActionRecord]
    assertions: list[AssertionResult]
    error: str = ""  # why the run could not complete ("" when it did)
    extra: dict = field(default_factory=dict)  # anything more the runner measured (e.g. convergence watches)

    @property
    def passed(self) -> bool:
        return not self.error and all(a.passed for a in self.assertions)


@dataclass(frozen=True)
class Report:
    scenario: str
    description: str
    seed: int
    runs: list[RunResult]
    source: str = ""  # the scenario file
    version: str = field(default_factory=svclab_version)

    @property
    def passed(self) -> bool:
        return bool(self.runs) and all(run.passed for run in self.runs)


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    junit: Path
    timeline: Path


def _iso(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _run_json(run: RunResult) -> dict:
    return {
        "mode": run.mode, "passed": run.passed, "error": run.error, "cluster": run.cluster,
        "t0": _iso(run.t0_wall), "t0_unix": run.t0_wall, "duration_s": run.duration,
        "generators": [{"name": g.spec.name, "spec": asdict(g.spec),
                        "summary": g.summary.to_json() if g.summary else None,
                        "requests": [r.to_json() for r in g.records]} for g in run.generators],
        "actions": [asdict(a) for a in run.actions],
        "assertions": [a.to_json() for a in run.assertions],
        "extra": run.extra,
    }


def report_json(report: Report) -> dict:
    return {"schema": SCHEMA, "scenario": report.scenario, "description": report.description,
            "source": report.source, "svclab_version": report.version, "seed": report.seed,
            "passed": report.passed, "runs": [_run_json(run) for run in report.runs]}


def write_json(report: Report, path: Path) -> None:
    Path(path).write_text(json.dumps(report_json(report), indent=1) + "\n")


def junit_xml(report: Report) -> ET.ElementTree:
    """JUnit XML as Jenkins, GitLab and GitHub read it: a suite per mode, a case per assertion."""
    cases = sum(len(run.assertions) + bool(run.error) for run in report.runs)
    failures = sum(not a.passed for run in report.runs for a in run.assertions)
    errors = sum(bool(run.error) for run in report.runs)
    top = ET.Element("testsuites", name=f"svclab scenario {report.scenario}", tests=str(cases),
                     failures=str(failures), errors=str(errors),
                     time=f"{sum(run.duration for run in report.runs):.3f}")
    for run in report.runs:
        suite = ET.SubElement(top, "testsuite", name=f"{report.scenario} [{run.mode}]",
                              tests=str(len(run.assertions) + bool(run.error)),
                              failures=str(sum(not a.passed for a in run.assertions)), errors=str(int(bool(run.error))),
                              skipped="0", time=f"{run.duration:.3f}", timestamp=_iso(run.t0_wall)[:19])
        properties = ET.SubElement(suite, "properties")
        for key, value in (("seed", report.seed), ("proxyMode", run.mode), ("svclab", report.version),
                           ("source", report.source)):
            ET.SubElement(properties, "property", name=key, value=str(value))
        classname = f"scenario.{report.scenario}.{run.mode}"
        if run.error:
            case = ET.SubElement(suite, "testcase", classname=classname, name="run", time="0")
            ET.SubElement(case, "error", message=run.error[:500], type="ScenarioError").text = run.error
        for result in run.assertions:
            case = ET.SubElement(suite, "testcase", classname=classname, name=result.name, time="0")
            if not result.passed:
                ET.SubElement(case, "failure", message=result.message, type=result.kind).text = (
                    f"window: {result.window}\nexpected: {result.expected}\nmeasured: {result.measured}\n")
            ET.SubElement(case, "system-out").text = result.message
    ET.indent(top)
    return ET.ElementTree(top)


def write_junit(report: Report, path: Path) -> None:
    junit_xml(report).write(path, encoding="utf-8", xml_declaration=True)


def write_report(report: Report, directory: Path) -> ReportFiles:
    """report.json, junit.xml and timeline.png in directory (made if missing)."""
    from testbed.scenario.plot import write_timeline  # matplotlib: only when a report is written

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(directory / "report.json", directory / "junit.xml", directory / "timeline.png")
    write_json(report, files.json)
    write_junit(report, files.junit)
    write_timeline(report, files.timeline)
    return files
