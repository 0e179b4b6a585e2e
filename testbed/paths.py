"""Where a cluster keeps its files: everything is found from the cluster's name."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from testbed.naming import check_cluster_name

DEFAULT_CLUSTER = "svclab"
DEFAULT_STATE_ROOT = Path("/var/lib/svclab")


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

    @property
    def up_log(self) -> Path:
        """The log of a detached `svclab up` (beside the state directory, which a start wipes)."""
        return self.path.parent / f"{self.path.name}-up.log"

    @property
    def ready_file(self) -> Path:
        """Touched by a detached `svclab up` once the cluster serves."""
        return self.path.parent / f"{self.path.name}.ready"

    def read_token(self) -> str:
        return self.token_file.read_text().strip()


def cluster_from_env() -> str:
    """The cluster a command acts on when --name is not given (like kubectl's current context)."""
    return os.environ.get("SVCLAB_CLUSTER", DEFAULT_CLUSTER)
