"""The Vagrant lab, as far as this machine can check it without a provider: the Vagrantfile
validates with Debian's vagrant, and its provisioning script's dry run passes here."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.kernel  # root: the dry run reads this machine's kernel modules

PROVISION = REPO / "scripts" / "vagrant-provision.sh"


def _validate(directory) -> subprocess.CompletedProcess:
    """`vagrant validate` of a copy: vagrant writes .vagrant/ next to the Vagrantfile it reads."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(directory), "VAGRANT_HOME": str(directory / "vagrant.d")}
    return subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=120)


def _lab_copy(tmp_path, with_provision: bool = True):
    shutil.copy(REPO / "Vagrantfile", tmp_path / "Vagrantfile")
    if with_provision:
        (tmp_path / "scripts").mkdir()
        for script in ("vagrant-provision.sh", "stock-kernel-modules.sh"):
            shutil.copy(REPO / "scripts" / script, tmp_path / "scripts" / script)
    return tmp_path


def test_the_vagrantfile_validates_and_provisions_with_the_script(tmp_path):
    if shutil.which("vagrant") is None:
        pytest.fail("vagrant is not installed: make setup installs Debian's vagrant")
    done = _validate(_lab_copy(tmp_path))
    assert done.returncode == 0 and "validated successfully" in done.stdout, done.stdout + done.stderr
    # and validation does look at the provisioner: without its script the same file is refused
    without = tmp_path / "without"
    without.mkdir()
    missing = _validate(_lab_copy(without, with_provision=False))
    assert "vagrant-provision.sh" in missing.stdout + missing.stderr, missing.stdout + missing.stderr


def test_the_provisioning_dry_run_takes_the_install_step_and_loads_the_stock_kernels_modules():
    done = subprocess.run(["bash", str(PROVISION), "--dry-run", str(REPO)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"would run: make -C {REPO} setup" in out, out  # the very same install step as make setup
    for module in ("ip_vs", "sch_netem", "openvswitch"):
        assert f"would run: modprobe {module}\n" in out, out
    assert "/etc/modules-load.d/svclab.conf" in out and f"ln -sfn {REPO}/.venv/bin/svclab /usr/local/bin/svclab" in out
    assert "every module is in" in out, out  # checked against the installed linux-image-amd64


def test_the_provisioning_refuses_a_directory_that_is_not_svclab(tmp_path):
    done = subprocess.run(["bash", str(PROVISION), "--dry-run", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and "is not an svclab checkout" in done.stderr, done.stderr
