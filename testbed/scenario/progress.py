"""What `svclab run` shows while it runs and when it ends, with rich.

ScenarioProgress: one live line (elapsed/total, ok/failed per generator, the last
action), redrawn by update(). assertions_table(): the final table (name, window,
expected, measured, PASS/FAIL), with a measured and a verdict column per proxy mode when
the scenario ran under several.
"""

from __future__ import annotations

from typing import Mapping

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from testbed.scenario.assertions import AssertionResult
from testbed.scenario.traffic import GeneratorStats


class ScenarioProgress:
    """`with ScenarioProgress(...) as progress: progress.update(elapsed, stats, last_action)`."""

    def __init__(self, scenario: str, total_s: float, mode: str = "", console: Console | None = None) -> None:
        self.scenario, self.total_s, self.mode = scenario, total_s, mode
        self.console = console or Console(stderr=True)
        self.elapsed = 0.0
        self.stats: dict[str, GeneratorStats] = {}
        self.last_action = ""
        self._live: Live | None = None

    def render(self) -> Text:
        line = Text()
        line.append(f"{self.scenario}", style="bold")
        if self.mode:
            line.append(f" [{self.mode}]")
        line.append(f"  {self.elapsed:5.1f}s / {self.total_s:g}s  ")
        for name, s in self.stats.items():
            line.append(f"{name} ")
            line.append(f"{s.ok} ok", style="green")
            line.append(" / ")
            line.append(f"{s.failed} failed", style="red" if s.failed else "dim")
            line.append("  ")
        line.append(f"last: {self.last_action or '-'}", style="cyan")
        return line

    def update(self, elapsed_s: float, stats: Mapping[str, GeneratorStats], last_action: str | None = None) -> None:
        self.elapsed = elapsed_s
        self.stats = dict(stats)
        if last_action is not None:
            self.last_action = last_action
        if self._live is not None:
            self._live.update(self.render(), refresh=True)

    def __enter__(self) -> "ScenarioProgress":
        self._live = Live(self.render(), console=self.console, auto_refresh=False, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None
            if not self.console.is_terminal:  # Live leaves its last line open there
                self.console.line()


def _verdict(result: AssertionResult | None) -> Text:
    if result is None:
        return Text("-", style="dim")
    return Text("PASS", style="bold green") if result.passed else Text("FAIL", style="bold red")


def assertions_table(runs: Mapping[str, list[AssertionResult]], title: str = "assertions") -> Table:
    """Rows in the scenario's order; a (measured, verdict) pair of columns per mode."""
    table = Table(title=title, show_lines=False)
    for column in ("assertion", "window", "expected"):
        table.add_column(column, overflow="fold")
    modes = list(runs)
    several = len(modes) > 1
    for mode in modes:
        table.add_column(Text(f"measured [{mode}]" if several else "measured"), overflow="fold")
        table.add_column(mode if several else "result", no_wrap=True)
    rows = max((len(results) for results in runs.values()), default=0)
    for i in range(rows):
        first = next(results[i] for results in runs.values() if i < len(results))
        cells: list = [Text(first.name), Text(first.window), Text(first.expected)]  # Text: no markup in them
        for mode in modes:
            result = runs[mode][i] if i < len(runs[mode]) else None
            cells += [Text(result.measured if result else ""), _verdict(result)]
        table.add_row(*cells)
    return table


def print_assertions(runs: Mapping[str, list[AssertionResult]], console: Console | None = None,
                     title: str = "assertions") -> None:
    (console or Console()).print(assertions_table(runs, title))
