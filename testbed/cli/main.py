"""The `svclab` command: one group, one module per family of verbs."""

from __future__ import annotations

import os
from pathlib import Path

import click

from testbed.cli.common import NAME_HELP, LazySvclabGroup, make_target
from testbed.paths import cluster_from_env


VERBS = {  # verb -> where it is defined, imported when it runs
    **{verb: f"testbed.cli.objects:{attr}" for verb, attr in
       (("apply", "apply"), ("get", "get"), ("describe", "describe_cmd"), ("delete", "delete"), ("scale", "scale"))},
    **{verb: f"testbed.cli.components:{verb.replace('-', '_')}" for verb in
       ("apiserver", "controller-manager", "kube-proxy", "kubelet", "cloud-controller", "lb-controller")},
    **{verb: f"testbed.cli.cluster_cmds:{attr}" for verb, attr in
       (("up", "up"), ("demo", "demo"), ("down", "down"), ("clean", "clean_cmd"), ("exec", "exec_cmd"),
        ("rules", "rules"))},
    **{verb: f"testbed.cli.supervise_cmds:{verb}" for verb in ("status", "stop", "start", "restart")},
    "validate": "testbed.cli.scenario_cmds:validate", "run": "testbed.cli.scenario_cmds:run",
    "fault": "testbed.cli.fault_cmds:fault", "vm": "testbed.cli.vm_cmds:vm",
}


@click.group(cls=LazySvclabGroup, lazy=VERBS, context_settings={"help_option_names": ["-h", "--help"]})
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

