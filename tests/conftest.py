"""Fixtures that run the real processes: an API server and a controller-manager.

Each test gets its own state directory under pytest's tmp_path; every process
a fixture starts is stopped by pid when the test ends.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.api.errors import Conflict
from testbed.client.client import ApiClient
from testbed.paths import StateDir

REPO = Path(__file__).resolve().parent.parent
TIERS = ("unit", "kernel", "cluster")  # pyproject.toml describes them; `make test-unit` runs the first


IN_VM = os.environ.get("SVCLAB_IN_VM") == "1"  # set by `svclab vm` (testbed/vm/boot.py)


def pytest_collection_modifyitems(config, items):
    """Every test belongs to a tier: a module's pytestmark, or its own mark (the more demanding wins).
    Tests marked vm need the stock kernel: outside the VM they are deselected, and
    tests/test_vm_tier.py runs them all in one VM boot."""
    untiered = [item.nodeid for item in items if not any(item.get_closest_marker(t) for t in TIERS)]
    if untiered:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(TIERS)}): {', '.join(untiered)}")
    if not IN_VM:
        in_vm_only = [item for item in items if item.get_closest_marker("vm")]
        if in_vm_only:
            config.hook.pytest_deselected(items=in_vm_only)
            items[:] = [item for item in items if not item.get_closest_marker("vm")]


def run(coro):
    """Run one coroutine to completion (tests are plain functions)."""
    return asyncio.run(coro)


async def update_with_retry(client: ApiClient, kind: str, name: str, change) -> None:
    """Read-modify-write that retries on Conflict (controllers and kubelets write the same
    objects: a Node's status heartbeat lands between a test's get and update)."""
    for _ in range(20):
        obj = await client.get(kind, name)
        change(obj)
        try:
            await client.update(obj)
            return
        except Conflict:
            await asyncio.sleep(0.05)
    raise AssertionError(f"{kind} {name} kept conflicting")


def svclab_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "testbed", *args]


@dataclass
class Process:
    args: list[str]
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass
class ApiServer:
    state: StateDir
    extra_args: list[str] = field(default_factory=list)
    process: Process | None = None

    def start(self) -> None:
        self.process = Process(
            svclab_command("apiserver", "--state-dir", str(self.state.path), *self.extra_args),
            self.state.path.parent / "apiserver.log",
        )
        self.process.start()
        deadline = time.monotonic() + 20
        while not self.state.api_socket.exists() or not self.state.token_file.exists():
            if self.process.proc.poll() is not None:
                raise RuntimeError(f"apiserver exited: {self.process.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("apiserver did not start in 20 s")
            time.sleep(0.02)
        run(self._wait_ready())

    async def _wait_ready(self) -> None:
        async with self.client() as client:
            await client.wait_ready()

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def kill9(self) -> None:
        if self.process:
            self.process.kill9()

    def client(self, with_token: bool = True) -> ApiClient:
        return ApiClient(self.state.api_address, self.state.read_token() if with_token else "")

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            svclab_command("--state-dir", str(self.state.path), *args),
            input=input, capture_output=True, text=True, cwd=REPO, timeout=60,
        )


@pytest.fixture
def make_apiserver(tmp_path):
    servers: list[ApiServer] = []

    def make(*extra_args: str, name: str = "s") -> ApiServer:
        server = ApiServer(StateDir(tmp_path / name), list(extra_args))
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def apiserver(make_apiserver) -> ApiServer:
    return make_apiserver()


@pytest.fixture
def controller_manager(apiserver, tmp_path):
    proc = Process(
        svclab_command("--state-dir", str(apiserver.state.path), "controller-manager",
                       "--node-monitor-grace-period", "2s"),
        tmp_path / "controller-manager.log",
    )
    proc.start()
    yield proc
    proc.stop()


os.environ.setdefault("PYTHONUNBUFFERED", "1")
