"""Scenario verbs: `svclab validate` (checks scenario files without running anything)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from testbed.scenario.loader import ScenarioError, load_scenario


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
