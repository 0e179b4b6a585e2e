"""What every CLI command shares: finding the cluster, running async calls, failing clearly."""

from __future__ import annotations

import asyncio
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import click

from testbed.api.errors import ApiError
from testbed.client.client import ApiClient
from testbed.cluster.config import parse_duration
from testbed.naming import check_cluster_name
from testbed.paths import DEFAULT_STATE_ROOT, StateDir

T = TypeVar("T")


@dataclass
class Target:
    """The cluster a command acts on (from --name, SVCLAB_CLUSTER or --state-dir)."""

    name: str
    state: StateDir
    named: bool = False  # the user named the cluster (--name or SVCLAB_CLUSTER), not the default

    def client(self) -> ApiClient:
        if not self.state.api_socket.exists():
            fail(
                f'cluster "{self.name}" is not running (no API socket at {self.state.api_socket}); '
                "start it with `svclab up`"
            )
        return ApiClient.for_state_dir(self.state)


def make_target(name: str, state_dir: Path | None, state_root: Path | None, named: bool = False) -> Target:
    try:
        check_cluster_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--name") from None
    if state_dir is not None:
        return Target(name, StateDir(state_dir), named)
    return Target(name, StateDir.for_cluster(name, state_root or DEFAULT_STATE_ROOT), named)


NAME_HELP = "Cluster to act on (default: $SVCLAB_CLUSTER or 'svclab')."


def _name_after_verb(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """`svclab up --name lab`: the verb's --name wins over the group's (as kind's flags go after the verb)."""
    if value is not None:
        current: Target = ctx.obj
        ctx.obj = make_target(value, None, current.state.path.parent, named=True)


class SvclabGroup(click.Group):
    """A group whose every command also takes --name after the verb, shown in its --help."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not any(p.name == "cluster_name" for p in cmd.params):
            cmd.params.append(click.Option(["--name", "cluster_name"], default=None, expose_value=False,
                                           callback=_name_after_verb, help=NAME_HELP))
        super().add_command(cmd, name)


class LazySvclabGroup(SvclabGroup):
    """A SvclabGroup that imports a verb's module only when that verb runs: `svclab get` and every
    component's start skip the imports of the others (faults, scenarios: half a second here, ten
    in the TCG VM). `lazy` maps each verb to "module:attribute"; --help imports them all."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, _, attribute = self.lazy[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)


def fail(message: str, code: int = 1) -> None:
    click.echo(message if message.startswith("error") else f"error: {message}", err=True)
    sys.exit(code)


def run_with_client(target: Target, fn: Callable[[ApiClient], Awaitable[T]]) -> T:
    """Run fn(client) to completion; API errors become one clear line and exit status 1."""

    async def main() -> T:
        async with target.client() as client:
            return await fn(client)

    try:
        return asyncio.run(main())
    except ApiError as exc:
        fail(f"Error from server: {exc.message}" if not exc.message.startswith("Error") else exc.message)
    raise AssertionError("unreachable")


def pass_target(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.pass_obj(fn)


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
