"""Bad input to the CLI: one clear error line naming the file or field, never a traceback, nothing changed.

Issue #10, section 4: binary and non-UTF-8 files, deep nesting, alias bombs, unbounded values in
messages, empty input to apply, duplicate keys, exec targets that try to leave the cluster's names.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import REPO, svclab_command

pytestmark = pytest.mark.unit

SERVICE = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports: [{port: 80}]\n"


def services(apiserver) -> list[str]:
    return apiserver.cli("get", "svc", "-o", "name").stdout.split()


def cli_bytes(apiserver, *args: str, input: bytes) -> subprocess.CompletedProcess:
    """The CLI with raw bytes on standard input (apiserver.cli speaks text)."""
    return subprocess.run(svclab_command("--state-dir", str(apiserver.state.path), *args),
                          input=input, capture_output=True, cwd=REPO, timeout=60)


def assert_clean_failure(r, *fragments: str) -> None:
    stderr = r.stderr if isinstance(r.stderr, str) else r.stderr.decode(errors="replace")
    assert r.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def test_apply_with_no_objects_is_an_error(apiserver, tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "dashes.yaml").write_text("---\n")
    (tmp_path / "comments.yaml").write_text("# nothing here\n---\n---\n")
    (tmp_path / "nothing").mkdir()
    cases = [(["-f", str(tmp_path / name)], "") for name in ("empty.yaml", "dashes.yaml", "comments.yaml", "nothing")]
    cases.append((["-f", "-"], ""))
    for args, stdin in cases:
        r = apiserver.cli("apply", *args, input=stdin)
        assert (r.returncode, r.stdout, r.stderr) == (1, "", "error: no objects passed to apply\n"), args
    assert services(apiserver) == ["service/kubernetes"]


def test_duplicate_keys_name_the_key_and_the_line(apiserver, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(SERVICE + "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  labels: {app: a}\n"
                              "  name: b\nspec: {ports: [{port: 80}]}\n")
    r = apiserver.cli("apply", "-f", str(path))
    assert_clean_failure(r, f'error parsing {path}:13: key "name" already set in map')
    r = apiserver.cli("apply", "-f", "-", input="apiVersion: v1\nkind: Service\nmetadata: {name: c}\n"
                                                "spec: {ports: [{port: 80, port: 81}]}\n")
    assert_clean_failure(r, 'error parsing STDIN:4: key "port" already set in map')
    assert services(apiserver) == ["service/kubernetes"]
    # the same key in different mappings, and a key that overrides a merged one, are no duplicates
    r = apiserver.cli("apply", "-f", "-", input="apiVersion: v1\nkind: Service\nmetadata: {name: web, labels: "
                                                "&l {name: x, app: y}}\nspec:\n  selector: {<<: *l, name: z}\n"
                                                "  ports: [{name: p, port: 80}]\n")
    assert r.returncode == 0, r.stderr
    assert services(apiserver) == ["service/kubernetes", "service/web"]


def test_binary_and_non_utf8_files_are_refused_cleanly(apiserver, tmp_path):
    png = tmp_path / "logo.yaml"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256)))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(SERVICE.replace("name: web", "name: caf\xe9").encode("latin-1"))
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(SERVICE.encode() + b"\x00\x00\x00")
    assert_clean_failure(apiserver.cli("apply", "-f", str(png)), f"error parsing {png}:1: invalid UTF-8")
    assert_clean_failure(apiserver.cli("apply", "-f", str(latin1)), f"error parsing {latin1}:4: invalid UTF-8")
    assert_clean_failure(apiserver.cli("apply", "-f", str(nul)), f"error parsing {nul}", "special characters")
    assert_clean_failure(apiserver.cli("delete", "-f", str(latin1)), f"error parsing {latin1}:4: invalid UTF-8")
    r = cli_bytes(apiserver, "apply", "-f", "-", input=png.read_bytes())
    assert_clean_failure(r, "error parsing STDIN:1: invalid UTF-8")
    # a directory's files are read the same way; a UTF-8 byte order mark is fine
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "bom.yaml").write_bytes(b"\xef\xbb\xbf" + SERVICE.encode())
    assert apiserver.cli("apply", "-f", str(tmp_path / "dir")).stdout == "service/web created\n"
    (tmp_path / "dir" / "z.yaml").write_bytes(latin1.read_bytes())
    assert_clean_failure(apiserver.cli("apply", "-f", str(tmp_path / "dir")), f"{tmp_path / 'dir' / 'z.yaml'}:4")


def test_deep_nesting_is_refused_not_a_recursion_error(apiserver):
    for opener, closer in (("[", "]"), ("{a: ", "}")):
        deep = SERVICE + "  colour: " + opener * 20000 + closer * 20000 + "\n"
        r = apiserver.cli("apply", "-f", "-", input=deep)
        assert_clean_failure(r, "error parsing STDIN:7: exceeded max depth of 10000")
    assert services(apiserver) == ["service/kubernetes"]
    # as deep as go-yaml allows still parses (the unknown field is only warned about)
    r = apiserver.cli("apply", "-f", "-", input=SERVICE + "  colour: " + "[" * 5000 + "]" * 5000 + "\n")
    assert r.returncode == 0 and 'unknown field "spec.colour"' in r.stderr, r.stderr[-2000:]


def billion_laughs(levels: int) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_alias_bombs_are_refused_cheaply(apiserver):
    bomb = billion_laughs(8)  # 43 million "lol"s: 312 MB of stderr once echoed whole
    assert len(bomb) < 500
    for where in ("apiVersion: v1\nkind: Service\nmetadata: *a7\n", "apiVersion: *a7\nkind: Service\n"):
        r = apiserver.cli("apply", "-f", "-", input=bomb + where)
        assert_clean_failure(r, "error parsing STDIN: document contains excessive aliasing")
        assert len(r.stderr) < 500
    # few aliases, but of a long string: go-yaml counts nodes only, svclab counts bytes too
    strings = f"s: &s {'x' * 1024 * 1024}\nl: [{','.join(['*s'] * 100)}]\n"
    r = apiserver.cli("apply", "-f", "-", input=strings + "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n")
    assert_clean_failure(r, "error parsing STDIN: document contains excessive aliasing")
    # an alias to the mapping that holds it has no end either
    r = apiserver.cli("apply", "-f", "-", input="apiVersion: v1\nkind: Service\nmetadata: &m {name: web, x: *m}\n")
    assert_clean_failure(r, "error parsing STDIN:3: anchor 'm' value contains itself")
    # a few aliases, as people use them, are fine
    r = apiserver.cli("apply", "-f", "-", input="apiVersion: v1\nkind: Service\nmetadata: {name: web, labels: "
                                                "&l {app: web}}\nspec: {selector: *l, ports: [{port: 80}]}\n")
    assert r.returncode == 0, r.stderr
    assert services(apiserver) == ["service/kubernetes", "service/web"]


def test_messages_truncate_long_values(apiserver):
    long = "x" * 100_000
    r = apiserver.cli("apply", "-f", "-", input=SERVICE.replace("port: 80", f"port: {long}"))
    assert_clean_failure(r, f"spec.ports[0].port: Invalid value: '{'x' * 1024}' [truncated 98976 chars]: "
                            "must be an integer")
    assert len(r.stderr) < 2000
    r = apiserver.cli("apply", "-f", "-", input=SERVICE.replace("name: web", f"name: web\n  labels: {{app: {long}}}"))
    assert_clean_failure(r, f'metadata.labels: Invalid value: "{"x" * 1024}" [truncated 98976 chars]: ')
    assert len(r.stderr) < 2000
    r = apiserver.cli("apply", "-f", "-", input=SERVICE.replace("kind: Service", f"kind: {long}"))
    assert_clean_failure(r, f'no matches for kind "{"x" * 1024} [truncated 98976 chars]" in version "v1"')
    assert len(r.stderr) < 2000
    # an explicit key: a plain one ends at 1024 characters
    r = apiserver.cli("apply", "-f", "-", input=SERVICE + f"  ? {long}\n  : 1\n")
    assert r.returncode == 0, r.stderr[:2000]
    assert f'Warning: STDIN (document 1): unknown field "spec.{"x" * 1019} [truncated 98981 chars]"' in r.stderr
    assert len(r.stderr) < 2000
    assert apiserver.cli("delete", "svc", "web").returncode == 0
    assert services(apiserver) == ["service/kubernetes"]


@pytest.mark.parametrize("name,problems", [
    ("../other-node", "[may not contain '/']"),
    ("node1/../../lab-node1", "[may not contain '/']"),
    ("..", "[may not be '..']"),
    ("%2e%2e", "[may not contain '%']"),
])
def test_exec_refuses_targets_that_leave_the_clusters_names(apiserver, name, problems):
    r = apiserver.cli("exec", name, "--", "true")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f'error: invalid resource name "{name}": {problems}\n'


def test_exec_of_an_unknown_pod_still_says_not_found(apiserver):
    r = apiserver.cli("exec", "nope-123", "--", "true")
    assert r.returncode == 1 and 'pods "nope-123" not found' in r.stderr
