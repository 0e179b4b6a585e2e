"""The committed gRPC/protobuf stubs are exactly what the .proto files generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")


def test_committed_stubs_match_protos(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'protos'}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(REPO / "protos/testbed/api/v1/api.proto")],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "testbed/api/v1" / name).read_text()
        committed = (REPO / "testbed/api/v1" / name).read_text()
        assert fresh == committed, f"testbed/api/v1/{name} is stale: run `make protos`"
