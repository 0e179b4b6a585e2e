"""The `svclab` command: one group, one module per family of verbs."""

from __future__ import annotations

import os
from pathlib import Path

import click

from testbed.cli import cluster_cmds, components, fault_cmds, objects, scenario_cmds, supervise_cmds, vm_cmds
from testbed.cli.common import NAME_HELP, SvclabGroup, make_target
from testbed.paths import cluster_from_env


@click.group(cls=SvclabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--name", default=None, help=NAME_HELP)
@click.option("--state-dir", type=click.Path(path_type=Path), default=None, hidden=True,
              help="Use the cluster whose state is in this directory.")
@click.option("--state-root", type=click.Path(path_type=Path), default=None, envvar="SVCLAB_STATE_ROOT",
              hidden=True, help="Where clusters keep their state (default /var/lib/svclab).")
@click.pass_context
def cli(ctx: click.Context, name: str | None, state_dir: Path | None, state_root: Path | None) -> None:
    """svclab: an emulated Kubernetes cluster to learn, test and break Service networking."""
    named = name is not None or "SVCLAB_CLUSTER" in os.environ
    ctx.obj = make_target(name or cluster_from_env(), state_dir, state_root, named=named)


for command in (objects.apply, objects.get, objects.describe_cmd, objects.delete, objects.scale,
                components.apiserver, components.controller_manager, components.kube_proxy,
                components.kubelet, components.cloud_controller, components.lb_controller,
                cluster_cmds.up, cluster_cmds.demo, cluster_cmds.down, cluster_cmds.clean_cmd, cluster_cmds.exec_cmd,
                cluster_cmds.rules, supervise_cmds.status, supervise_cmds.stop, supervise_cmds.start,
                supervise_cmds.restart, scenario_cmds.validate, scenario_cmds.run, fault_cmds.fault, vm_cmds.vm):
    cli.add_command(command)
