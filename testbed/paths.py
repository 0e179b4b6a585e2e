"""Where a cluster keeps its files: everything is found from the cluster's name."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CLUSTER = "svclab"
DEFAULT_STATE_ROOT = Path("/var/lib/svclab")
# Short and without '-': it prefixes bridge and interface names (15 characters at
# most) and is separated from the rest of them by '-'.
_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")


def check_cluster_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"invalid cluster name {name!r}: use 1-8 lower-case letters or digits, starting with a letter"
        )
    return name


@dataclass(frozen=True)
class StateDir:
    path: Path

    @classmethod
    def for_cluster(cls, name: str, root: Path = DEFAULT_STATE_ROOT) -> "StateDir":
        return cls(root / check_cluster_name(name))

    @property
    def api_socket(self) -> Path:
        return self.path / "api.sock"

    @property
    def api_address(self) -> str:
        return f"unix://{self.api_socket}"

    @property
    def token_file(self) -> Path:
        return self.path / "token"

    @property
    def database(self) -> Path:
        return self.path / "state.db"

    def read_token(self) -> str:
        return self.token_file.read_text().strip()


def cluster_from_env() -> str:
    """The cluster a command acts on when --name is not given (like kubectl's current context)."""
    return os.environ.get("SVCLAB_CLUSTER", DEFAULT_CLUSTER)
