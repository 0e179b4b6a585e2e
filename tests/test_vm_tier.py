"""The VM tier: every test marked vm, run in one boot of the stock-kernel VM (`svclab vm`).

Outside the VM those tests are deselected (tests/conftest.py); this test boots the VM once
and runs them there, with pytest's own report passed through. Where the VM cannot boot
(no qemu, no stock kernel) it says so in one explicit skip line.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from testbed.vm.boot import VmUnavailable, missing_tools, stock_kernel
from tests.conftest import IN_VM, REPO

VM_TIER_TIMEOUT_S = 900  # TCG: a boot and a few clusters; the goal is ~10 minutes
MIN_VM_TESTS = 9  # netem delay, the OVS kernel datapath, and IPVS mode's seven (tests/test_proxy_ipvs.py)
VM_SELECTION = "vm and not cluster"  # whole clusters take minutes each to start under TCG


def _vm_test_files() -> list[str]:
    """The modules holding vm-marked tests: the VM collects only those (imports are slow there)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "mark.vm" in p.read_text())


def _why_the_vm_cannot_boot() -> str | None:
    missing = missing_tools()
    if missing:
        return f"missing {', '.join(missing)} (make setup installs them)"
    try:
        stock_kernel()
    except VmUnavailable as exc:
        return str(exc)
    return None


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(VM_TIER_TIMEOUT_S + 60)
@pytest.mark.skipif(IN_VM, reason="already inside the VM")
def test_vm_tier_passes_in_one_boot_of_the_stock_kernel(tmp_path):
    reason = _why_the_vm_cannot_boot()
    if reason:
        pytest.skip(f"VM tier not run (IPVS mode, netem delay, OVS kernel datapath untested): {reason}")
    junit = tmp_path / "vm-tier.xml"
    inner = [sys.executable, "-m", "pytest", "-q", "-m", VM_SELECTION, "-p", "no:cacheprovider", "-rs",
             f"--basetemp={tmp_path / 'in-vm'}", f"--junitxml={junit}", *_vm_test_files()]
    argv = [sys.executable, "-m", "testbed", "vm", "--memory", "3G", "--cpus", "2", "--rwdir", str(tmp_path),
            "--", *inner]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=VM_TIER_TIMEOUT_S)
    output = f"exit {done.returncode}\n--- stdout\n{done.stdout[-20000:]}\n--- stderr\n{done.stderr[-4000:]}"
    assert done.returncode == 0, output
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    ran, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    assert ran >= MIN_VM_TESTS and skipped == 0, f"{ran} tests, {skipped} skipped in the VM\n{output}"
    print(done.stdout[-3000:])


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (["--memory", "2X"], "--memory '2X': a size such as 2G or 3072M"),
    (["--cpus", "0"], "--cpus 0: 1 to 64"),
    (["--kernel", "/nonexistent/vmlinuz"], "--kernel /nonexistent/vmlinuz: no such file"),
])
def test_bad_vm_options_are_refused_naming_the_option_before_anything_boots(args, message):
    done = subprocess.run([sys.executable, "-m", "testbed", "vm", *args, "--", "true"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.unit
def test_the_vm_keeps_its_writes_in_overlays_but_the_current_directory_and_rwdirs(tmp_path):
    from pathlib import Path

    from testbed.vm.boot import VmSpec, vng_command
    kernel = tmp_path / "vmlinuz-6.1.0-1-amd64"
    kernel.write_bytes(b"")
    argv = vng_command(VmSpec(kernel=kernel, rwdirs=(tmp_path,)), ["svclab", "up"], Path("/work"), kvm=False)
    pairs = list(zip(argv, argv[1:]))
    assert {("--overlay-rwdir", d) for d in ("/etc", "/var", "/run")} <= set(pairs)
    assert ("--rwdir", "/work") in pairs and ("--rwdir", str(tmp_path)) in pairs
    assert "--disable-kvm" in argv and ("--cwd", "/work") in pairs
    assert argv[-1].endswith("scripts/vm-init.sh svclab up") and "SVCLAB_IN_VM=1" in argv[-1]
