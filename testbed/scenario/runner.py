"""`svclab run`: a scenario played on a fresh cluster, once per proxy mode, judged and reported.

Per mode (ModeRun): the cluster is brought up as `svclab up` does (lifecycle.Cluster with
the scenario's cluster config and manifests), the runner waits until the manifests serve
(conditions.ClusterState.serving), resolves the traffic generators' sources and targets,
starts them with t0 a moment ahead, plays the timeline (player.py) to the end of the run,
lets the generators finish, judges every assertion (judge.py) and tears the cluster down,
whatever happened (an error, an assertion that failed, Ctrl-C or SIGTERM), unless it is
kept (--keep: the last mode's cluster stays up). `svclab down` of the cluster stops a run
as SIGTERM does: this process is recorded as the cluster's `up`.

The outcome: 0 every assertion held, 1 one failed, 2 the scenario could not run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rich.console import Console

from testbed.cluster.lifecycle import Cluster, ClusterError
from testbed.faults import FaultTarget
from testbed.paths import StateDir
from testbed.scenario.conditions import ClusterState, wait_until
from testbed.scenario.execute import ActionContext
from testbed.scenario.judge import RunFacts, judge
from testbed.scenario.live import Live
from testbed.scenario.model import Scenario
from testbed.scenario.observe import Observer
from testbed.scenario.plan import ActionIndex
from testbed.scenario.player import Player, PlayError
from testbed.scenario.progress import ScenarioProgress
from testbed.scenario.report import GeneratorResult, Report, RunResult
from testbed.scenario.resolve import Resolver, Unresolved, generator_specs
from testbed.scenario.traffic import Traffic

LEAD_S = 2.0  # t0 this long after the generators are launched: each is set up and waiting by then
SERVE_TIMEOUT_S = 90.0
START_TIMEOUT_S = 120.0  # the cluster up and its manifests applied (Cluster.start)
EXIT_PASSED, EXIT_FAILED, EXIT_NOT_RUN = 0, 1, 2


class RunError(RuntimeError):
    """The scenario could not run in a mode (str(): why)."""


@dataclass
class RunOptions:
    cluster_name: str
    state_root: Path
    modes: list[str]
    report_dir: Path
    keep: bool = False
    start_timeout: float = START_TIMEOUT_S  # svclab run --start-timeout: slow machines (the TCG VM) need more
    console: Console = field(default_factory=lambda: Console(stderr=True))


class ModeRun:
    """One run of the scenario on a fresh cluster in one proxy mode."""

    def __init__(self, scenario: Scenario, mode: str, options: RunOptions) -> None:
        self.scenario, self.mode, self.options = scenario, mode, options
        self.settings = scenario.cluster_settings(options.cluster_name, mode)
        self.state = StateDir.for_cluster(options.cluster_name, options.state_root)
        self.cluster = Cluster(scenario.cluster_config(options.cluster_name, mode), self.state,
                               progress=lambda line: options.console.print(line, markup=False, highlight=False))
        self.out_dir = options.report_dir / mode
        self.error = ""
        self.t0_wall = time.time()
        self.extra: dict = {}
        self.ctx: ActionContext | None = None
        self.observer: Observer | None = None
        self.player: Player | None = None
        self.traffic: Traffic | None = None
        self.summaries: dict = {}
        self.results: list = []

    def run(self) -> RunResult:
        try:
            self._start()
            with Live(self.state) as live:
                self._wait_serving(live)
                self._play(live)
        except (RunError, ClusterError, PlayError, Unresolved) as exc:
            self.error = str(exc)
        return self.result()

    def _start(self) -> None:
        self.options.console.print(f"[{self.mode}] starting cluster {self.options.cluster_name} "
                                   f"({self.settings['nodes']} nodes)", markup=False, highlight=False)
        started = time.monotonic()
        try:
            self.cluster.start(self.scenario.manifest_objects().objects, timeout=self.options.start_timeout)
        except ClusterError as exc:
            raise RunError(f"the cluster did not start: {exc}") from None
        self.cluster.processes.record("up", os.getpid())  # `svclab down` stops the run (SIGTERM)
        self.extra["cluster_start_s"] = round(time.monotonic() - started, 2)

    def _wait_serving(self, live: Live) -> None:
        started = time.monotonic()
        cluster = ClusterState(live, self.options.cluster_name, self.state.path)
        timeout = SERVE_TIMEOUT_S + max(0.0, self.options.start_timeout - START_TIMEOUT_S)
        state = wait_until(cluster.serving, timeout)
        if not state.holds:
            raise RunError(f"the manifests did not serve within {timeout:g}s: {state.detail}")
        self.extra["serving_s"] = round(time.monotonic() - started, 2)

    def _play(self, live: Live) -> None:
        name = self.options.cluster_name
        self.ctx = ActionContext(live, FaultTarget(name, self.state), self.scenario.base_dir,
                                 ActionIndex.of(self.scenario.timeline))
        self.ctx.pods.snapshot(live)
        cluster = ClusterState(live, name, self.state.path)
        resolver = Resolver(live, name, self.ctx.picked)
        specs = generator_specs(self.scenario, resolver)
        t0 = time.monotonic() + LEAD_S
        self.t0_wall = time.time() + LEAD_S
        self.observer = Observer(self.scenario, cluster, resolver, self.ctx.target, t0)
        self.player = Player(self.scenario, self.ctx, cluster, self.observer, t0)
        self.traffic = Traffic(specs, t0, self.out_dir)
        with self.traffic, ScenarioProgress(self.scenario.name, self.scenario.duration, self.mode,
                                            self.options.console) as progress:
            self.player.progress = lambda t, last: progress.update(t, self.traffic.stats(), last)
            self.player.play()
            self.summaries = wait_generators(self.traffic)
            progress.update(self.scenario.duration, self.traffic.stats())
        self.observer.finish()
        with contextlib.suppress(Exception):
            self.ctx.pods.snapshot(live)
        self.results = self._judge()

    def _judge(self) -> list:
        facts = RunFacts(self.traffic.records(), self.player.times, self.ctx.pods, self.ctx.picks, self.observer)
        return judge(self.scenario, facts)

    def result(self, error: str = "") -> RunResult:
        """What the run did and measured so far (a run stopped early keeps its requests and actions)."""
        self.error = self.error or error
        generators = []
        for name, generator in (self.traffic.generators.items() if self.traffic else []):
            summary = self.summaries.get(name)
            if summary is None:
                with contextlib.suppress(RuntimeError):
                    summary = generator.summary()
            generators.append(GeneratorResult(generator.spec, summary, generator.records()))
        if self.error and not self.results and self.player is not None and self.player.times:
            with contextlib.suppress(Exception):  # what can be judged of a run stopped early
                self.observer.finish(5)
                self.results = self._judge()
        extra = dict(self.extra)
        died = [g.spec.name for g in generators if g.summary is None]
        if died:  # e.g. a probe in a pod of a crashed node dies with the pod
            extra["generators_without_summary"] = died
        if self.observer is not None:
            extra.update(self.observer.to_json())
        if self.ctx is not None:
            extra["picks"] = {str(p): [i.to_json() for i in pods] for p, pods in self.ctx.picks.items()}
        return RunResult(self.mode, self.settings, self.t0_wall, self.scenario.duration, generators,
                         self.player.actions if self.player else [], self.results, self.error, extra)

    def teardown(self) -> None:
        with signals_held():
            self.options.console.print(f"[{self.mode}] tearing down cluster {self.options.cluster_name}",
                                       markup=False, highlight=False)
            self.cluster.stop()


def wait_generators(traffic: Traffic) -> dict:
    """Each generator's summary once it ended; None for one whose probe died without writing it
    (a probe in a pod dies with the pod, e.g. on a crashed node)."""
    summaries = {}
    for name, generator in traffic.generators.items():
        try:
            summaries[name] = generator.wait()
        except RuntimeError:
            summaries[name] = None
    return summaries


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM ignored for the block: a second Ctrl-C does not cut a teardown short."""
    held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


@dataclass
class ScenarioRun:
    """What `svclab run` did: the report, whether it was interrupted, the cluster kept (--keep)."""

    report: Report
    interrupted: bool = False
    kept: ModeRun | None = None

    @property
    def exit_code(self) -> int:
        if self.interrupted or any(run.error for run in self.report.runs) or not self.report.runs:
            return EXIT_NOT_RUN
        return EXIT_PASSED if self.report.passed else EXIT_FAILED


def run_scenario(scenario: Scenario, options: RunOptions) -> ScenarioRun:
    """Every mode, one after the other (each on a fresh cluster of the same name); SIGTERM is
    handled as Ctrl-C: the run stops, its cluster is torn down, the report keeps what it had."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    runs: list[RunResult] = []
    outcome = ScenarioRun(Report(scenario.name, scenario.description, scenario.seed, runs,
                                 str(scenario.path or "")))
    try:
        for i, mode in enumerate(options.modes):
            mode_run = ModeRun(scenario, mode, options)
            keep = options.keep and i == len(options.modes) - 1
            try:
                runs.append(mode_run.run())
            except KeyboardInterrupt:
                outcome.interrupted = True
                runs.append(mode_run.result("interrupted (SIGINT or SIGTERM)"))
                keep = False
                break
            finally:
                if keep and not outcome.interrupted:
                    outcome.kept = mode_run
                else:
                    mode_run.teardown()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return outcome
