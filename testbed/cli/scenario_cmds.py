"""Scenario verbs: `svclab validate` (checks scenario files without running anything) and
`svclab run` (plays one on fresh clusters: testbed/scenario/runner.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from testbed.cli.common import Duration
from testbed.scenario.loader import ScenarioError, load_scenario

EXIT_NOT_RUN = 2  # runner.EXIT_NOT_RUN (not imported here: `svclab validate` stays light)
TABLE_WIDTH = 160  # the assertions table's width when stdout is not a terminal


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
def validate(files: tuple[Path, ...]) -> None:
    """Check scenario files: prints FILE: ok, or every problem as file:line: field: message.

    Exit status 0 when every file is valid, 1 otherwise."""
    invalid = 0
    for path in files:
        try:
            load_scenario(path)
        except ScenarioError as exc:
            invalid += 1
            click.echo(str(exc))
            continue
        click.echo(f"{path}: ok")
    sys.exit(1 if invalid else 0)


def _modes(value: str | None) -> list[str] | None:
    if value is None:
        return None
    from testbed.cluster.config import MODES

    modes = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise click.BadParameter(f"{value!r}: give each mode once, of {', '.join(MODES)} (e.g. iptables,nftables)",
                                 param_hint="--proxy-mode")
    return modes


def _stop(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_NOT_RUN)


@click.command(name="run")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--report", "report_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where report.json, junit.xml and timeline.png go (default: ./<scenario>-<date>-<time>).")
@click.option("--seed", type=int, default=None, help="The random seed (default: the scenario's).")
@click.option("--proxy-mode", "proxy_modes", default=None, metavar="MODE[,MODE]",
              help="kube-proxy mode(s), one run each, reported side by side (default: the scenario's).")
@click.option("--keep", is_flag=True, help="Leave the (last) cluster up for inspection; `svclab down` ends it.")
@click.option("--name", "cluster_name", default=None,
              help="The cluster's name (default: the scenario's cluster.name, else made from its name).")
@click.option("--start-timeout", type=Duration(), default="120s", show_default=True,
              help="How long the cluster may take to start (raise it where everything is slow, e.g. in `svclab vm`).")
@click.pass_context
def run(ctx: click.Context, file: Path, report_dir: Path | None, seed: int | None, proxy_modes: str | None,
        keep: bool, cluster_name: str | None, start_timeout: float) -> None:
    """Run a scenario: a fresh cluster, its manifests, traffic, timeline and assertions; a report.

    Exit status 0 when every assertion held, 1 when one failed, 2 when the scenario could not
    run (an invalid file, a cluster that did not start, an action that failed, Ctrl-C)."""
    modes = _modes(proxy_modes)
    try:
        scenario = load_scenario(file).with_seed(seed)
    except ScenarioError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_NOT_RUN)
    if os.geteuid() != 0:
        _stop("svclab run needs root (network namespaces, Open vSwitch)")
    from testbed.cluster.lifecycle import is_running
    from testbed.cli.common import make_target
    from testbed.scenario.runner import RunOptions, run_scenario

    target = ctx.obj
    name = cluster_name or (target.name if target.named else scenario.cluster_name())
    root = target.state.path.parent
    try:
        state = make_target(name, None, root).state
    except click.BadParameter as exc:
        _stop(str(exc.message))
    if is_running(state):
        _stop(f'cluster "{name}" is already running (svclab down --name {name}, or svclab run --name OTHER)')
    directory = report_dir or Path.cwd() / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    options = RunOptions(name, root, modes or scenario.cluster.proxy_modes, directory, keep, start_timeout)
    outcome = run_scenario(scenario, options)
    _report(outcome, directory)
    if outcome.kept is not None:
        _hold(outcome, name)
    sys.exit(outcome.exit_code)


def _report(outcome, directory: Path) -> None:
    from rich.console import Console

    from testbed.scenario.progress import print_assertions
    from testbed.scenario.report import write_report

    files = write_report(outcome.report, directory)
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ  # else a log: whole names, few wraps
    console = Console(width=None if wide else TABLE_WIDTH)
    print_assertions({run.mode: run.assertions for run in outcome.report.runs}, console,
                     title=f"{outcome.report.scenario} (seed {outcome.report.seed})")
    for run in outcome.report.runs:
        if run.error:
            click.echo(f"[{run.mode}] the scenario could not run: {run.error}", err=True)
    verdict = ("INTERRUPTED" if outcome.interrupted else "PASSED" if outcome.exit_code == 0
               else "FAILED" if outcome.exit_code == 1 else "NOT RUN")
    click.echo(f"{verdict}: report in {files.json.parent} ({files.json.name}, {files.junit.name}, "
               f"{files.timeline.name})")


def _hold(outcome, name: str) -> None:
    from testbed.cli.cluster_cmds import hold

    click.echo(f'cluster "{name}" kept up: svclab --name {name} get pods -o wide, svclab --name {name} '
               f"rules node1, ...; `svclab --name {name} down` (or Ctrl-C) ends it", err=True)
    hold(outcome.kept.cluster, interactive=sys.stdin.isatty())
