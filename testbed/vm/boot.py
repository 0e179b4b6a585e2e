"""Boot Debian's stock kernel on a copy-on-write view of this machine (virtme-ng) and run a command.

Why a VM: a kernel built without IP_VS, sch_netem or the openvswitch module cannot run IPVS
mode, netem delay or the OVS kernel datapath; the stock kernel of linux-image-amd64 has all
three. vng boots it with this machine's own root filesystem (read-only, /tmp shared), so the
repository, its .venv and the installed packages are all there and nothing is copied.
Writes to /etc, /var, /run and /tmp land in overlays that vanish with the VM: the guest's own
Open vSwitch database, /run/netns and /var/lib/svclab never reach the host. The current
directory (and any --rwdir) is the host's own, writable: reports written there are kept.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST_INIT = REPO / "scripts" / "vm-init.sh"
OVERLAY_DIRS = ("/etc", "/var", "/run")
KVM_PROBE_SECONDS = 3.0
SIZE = re.compile(r"^[1-9][0-9]*[MG]$")


class VmUnavailable(RuntimeError):
    """What this machine lacks to boot the VM, with the install step that provides it."""


@dataclass(frozen=True)
class VmSpec:
    memory: str = "3G"
    cpus: int = 2
    kernel: Path | None = None  # default: the newest /boot/vmlinuz-*
    rwdirs: tuple[Path, ...] = ()  # host directories the guest writes through to (besides cwd)

    def __post_init__(self) -> None:
        if not SIZE.match(self.memory):
            raise ValueError(f"--memory {self.memory!r}: a size such as 2G or 3072M")
        if not 1 <= self.cpus <= 64:
            raise ValueError(f"--cpus {self.cpus}: 1 to 64")


def stock_kernel(requested: Path | None = None) -> Path:
    """The kernel image to boot: the one asked for, else the newest Debian vmlinuz in /boot."""
    if requested is not None:
        if not requested.is_file():
            raise VmUnavailable(f"--kernel {requested}: no such file")
        return requested
    images = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: _version_key(p.name))
    if not images:
        raise VmUnavailable("no kernel image in /boot: install Debian's linux-image-amd64 (make setup does)")
    return images[-1]


def _version_key(name: str) -> list[int]:
    return [int(part) for part in re.findall(r"\d+", name)]


def vng_binary() -> Path:
    """vng from this interpreter's environment (the .venv), where virtme-ng is pinned."""
    candidate = Path(sys.executable).parent / "vng"
    if candidate.exists():
        return candidate
    found = shutil.which("vng")
    if found is None:
        raise VmUnavailable("virtme-ng's vng is not installed: run make setup (it pins virtme-ng in .venv)")
    return Path(found)


def missing_tools() -> list[str]:
    """Host programs the VM needs that are not installed (empty: the VM can boot)."""
    missing = [tool for tool in ("qemu-system-x86_64",) if shutil.which(tool) is None]
    if shutil.which("busybox") is None and not Path("/bin/busybox").exists():
        missing.append("busybox (busybox-static: vng builds its initramfs with it)")
    return missing


def kvm_works(kernel: Path) -> bool:
    """Whether qemu can run this kernel under KVM here. /dev/kvm may exist and still fail (nested
    virtualization refusing an MSR makes qemu abort at once): boot briefly and see that it lives."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    probe = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "128", "-display", "none",
             "-nodefaults", "-no-reboot", "-kernel", str(kernel), "-append", "panic=-1"]
    try:
        done = subprocess.run(probe, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=KVM_PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        return True  # still booting under KVM: it works
    return done.returncode == 0


def vng_command(spec: VmSpec, command: list[str], cwd: Path, kvm: bool) -> list[str]:
    """The vng invocation running `command` as root in cwd after the guest's preparation."""
    kernel = stock_kernel(spec.kernel)
    argv = [str(vng_binary()), "--run", str(kernel), "--user", "root", "--memory", spec.memory,
            "--cpus", str(spec.cpus), "--cwd", str(cwd)]
    if not kvm:
        argv.append("--disable-kvm")
    for directory in OVERLAY_DIRS:
        argv += ["--overlay-rwdir", directory]
    for directory in dict.fromkeys([cwd, *(d.resolve() for d in spec.rwdirs)]):
        argv += ["--rwdir", str(directory)]
    guest_path = f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"
    inner = shlex.join(["env", f"PATH={guest_path}", "SVCLAB_IN_VM=1", "bash", str(GUEST_INIT), *command])
    return [*argv, "--exec", inner]


def run(spec: VmSpec, command: list[str], cwd: Path | None = None) -> int:
    """Boot, run `command` (an interactive shell if empty), and return its exit status."""
    missing = missing_tools()
    if missing:
        raise VmUnavailable(f"cannot boot the VM: missing {', '.join(missing)}: run make setup")
    kernel = stock_kernel(spec.kernel)
    argv = vng_command(spec, command or ["bash", "-i"], (cwd or Path.cwd()).resolve(), kvm_works(kernel))
    env = dict(os.environ)
    env["PATH"] = f"{vng_binary().parent}:{env.get('PATH', '/usr/bin:/bin')}"  # vng calls virtme-run
    return subprocess.run(argv, env=env).returncode
