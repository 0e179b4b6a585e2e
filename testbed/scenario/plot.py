"""timeline.png: every request of a scenario run over time, one panel per generator and per mode.

A dot per successful request at (start time, latency), coloured by the pod that answered
(one colour per pod across all panels); failures marked by kind (a marker of its own for
each outcome); timeline actions as labelled vertical lines. Latency on a log scale, so a
1 s timeout and a 2 ms answer share a panel. Drawn with matplotlib's Agg backend (no display).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, NullFormatter  # noqa: E402

from testbed.scenario.report import GeneratorResult, Report, RunResult  # noqa: E402

FAILURE_MARKERS = {"refused": ("s", "tab:red"), "timeout": ("x", "black"), "reset": ("D", "tab:purple"),
                   "dns-error": ("^", "tab:orange"), "http-error": ("v", "tab:brown"), "error": ("*", "tab:gray")}
PANEL_HEIGHT = 2.6
MIN_LATENCY_MS = 0.05  # floor on the log axis (a 0 ms record still shows)


def _pod_colours(report: Report) -> dict[str, tuple]:
    pods = sorted({r.pod or "(unnamed)" for run in report.runs for g in run.generators for r in g.records if r.ok})
    palette = plt.get_cmap("tab10" if len(pods) <= 10 else "tab20")
    return {pod: palette(i % palette.N) for i, pod in enumerate(pods)}


def _title(run: RunResult, g: GeneratorResult) -> str:
    ok = sum(r.ok for r in g.records)
    rate = (f", {g.summary.achieved_rate:g}/s of {g.summary.asked_rate:g}/s asked" if g.summary else "")
    source = g.spec.source or g.spec.netns or "here"
    return (f"{g.spec.name} [{run.mode}]: {source} -> {g.spec.target} ({g.spec.connections}); "
            f"{ok}/{len(g.records)} ok{rate}")


def _panel(ax, run: RunResult, g: GeneratorResult, colours: dict[str, tuple]) -> set[str]:
    """Draw one panel; return the failure kinds it showed."""
    by_pod: dict[str, list] = {}
    failed: dict[str, list] = {}
    for r in g.records:
        point = (r.t, max(r.latency_ms, MIN_LATENCY_MS))
        (by_pod.setdefault(r.pod or "(unnamed)", []) if r.ok else failed.setdefault(r.outcome, [])).append(point)
    for pod, points in sorted(by_pod.items()):
        ax.scatter(*zip(*points), s=9, color=colours[pod], linewidths=0)
    for kind, points in sorted(failed.items()):
        marker, colour = FAILURE_MARKERS.get(kind, FAILURE_MARKERS["error"])
        ax.scatter(*zip(*points), s=28, marker=marker, color=colour, linewidths=1.2)
    for action in run.actions:
        ax.axvline(action.t, color="tab:red" if not action.ok else "0.35", linestyle="--", linewidth=1)
        ax.annotate(action.name or action.action, (action.t, 1), xycoords=("data", "axes fraction"),
                    xytext=(2, -2), textcoords="offset points", va="top", fontsize=7, rotation=90, color="0.2",
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "alpha": 0.7, "linewidth": 0})
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(0, max(run.duration, max((r.t for r in g.records), default=0.0)))
    ax.set_ylabel("latency ms")
    ax.set_title(_title(run, g), fontsize=8, loc="left")
    ax.grid(True, which="major", alpha=0.3)
    return set(failed)


def write_timeline(report: Report, path: Path) -> None:
    panels = [(run, g) for run in report.runs for g in run.generators]
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(12, 1.2 + PANEL_HEIGHT * max(1, len(panels))),
                             squeeze=False, layout="constrained")
    colours = _pod_colours(report)
    kinds: set[str] = set()
    for ax, (run, g) in zip(axes[:, 0], panels):
        kinds |= _panel(ax, run, g, colours)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no traffic generators", ha="center", va="center", transform=axes[0, 0].transAxes)
    axes[-1, 0].set_xlabel("seconds after the scenario's start")
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=pod) for pod, c in colours.items()]
    handles += [Line2D([], [], marker=FAILURE_MARKERS[k][0], linestyle="", color=FAILURE_MARKERS[k][1], label=k)
                for k in FAILURE_MARKERS if k in kinds]
    verdict = "PASSED" if report.passed else "FAILED"
    fig.suptitle(f"{report.scenario} (seed {report.seed}): {verdict}", fontsize=10)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(8, len(handles)), fontsize=7,
                   frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
