"""`svclab vm`: run a command (or a shell) as root in the stock-kernel VM (testbed/vm)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from testbed.cli.common import fail


@click.command("vm", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--memory", default="3G", show_default=True, help="Guest memory (e.g. 2G, 3072M).")
@click.option("--cpus", type=int, default=2, show_default=True, help="Guest CPUs.")
@click.option("--kernel", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Kernel image to boot (default: the newest /boot/vmlinuz-*, Debian's linux-image-amd64).")
@click.option("--rwdir", "rwdirs", multiple=True, type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="A host directory the VM writes through to (repeatable); the current directory always is.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def vm(memory: str, cpus: int, kernel: Path | None, rwdirs: tuple[Path, ...], command: tuple[str, ...]) -> None:
    """Run COMMAND as root in a VM booting Debian's stock kernel (IPVS, netem, the OVS kernel datapath).

    The VM sees this machine's files read-only, starts in the current directory and passes
    COMMAND's output and exit status through. Writes to the current directory (and --rwdir)
    reach this machine; writes to /etc, /var, /run and /tmp stay in the VM (svclab's state, the
    VM's own Open vSwitch). Without COMMAND it opens a shell. Example:

      svclab vm -- svclab run scenarios/iptables-vs-nftables.yaml --proxy-mode ipvs
    """
    from testbed.vm.boot import VmSpec, VmUnavailable, run
    try:
        spec = VmSpec(memory=memory, cpus=cpus, kernel=kernel, rwdirs=rwdirs)
        sys.exit(run(spec, list(command)))
    except ValueError as exc:
        fail(str(exc), code=2)
    except VmUnavailable as exc:
        fail(str(exc), code=2)
