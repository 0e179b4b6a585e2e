"""Running the kernel's rule tools; every failure raises with the command and its output."""

from __future__ import annotations

import subprocess


class RulesFailed(RuntimeError):
    def __init__(self, argv: list[str], returncode: int, output: str) -> None:
        super().__init__(f"{' '.join(argv)} failed ({returncode}): {output.strip()}")
        self.argv, self.returncode, self.output = argv, returncode, output


def run(argv: list[str], stdin: str | None = None) -> str:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise RulesFailed(argv, result.returncode, result.stderr or result.stdout)
    return result.stdout


def succeeds(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True).returncode == 0


def check_in_scratch_netns(argv: list[str], stdin: str) -> None:
    """Load rules into a brand-new, empty network namespace that dies with the command: the
    kernel's own verdict on them, with no effect on the caller's namespace."""
    run(["unshare", "--net", "--", *argv], stdin)
