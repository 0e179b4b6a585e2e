"""The kubectl-like verbs: apply, get, describe, delete, scale."""

from __future__ import annotations

import sys

import click

from testbed.api.errors import ApiError, Conflict, NotFound
from testbed.api.kinds import UnknownKind, kind_named, kind_of
from testbed.cli.common import Target, fail, pass_target, run_with_client
from testbed.cli.printers import as_list_document, describe, dump, resource_name, table
from testbed.api.kube_json import to_dict
from testbed.api.meta import SERVICE_NAME_LABEL
from testbed.client.apply import ApplyFailed, apply_objects
from testbed.manifests import ManifestInvalid, load_paths

namespace_option = click.option("-n", "--namespace", default="", help="Namespace (default: default).")


def _load(files: tuple[str, ...], namespace: str):
    stdin = sys.stdin.buffer.read() if "-" in files else None  # bytes: decoded (or refused) as files are
    try:
        manifest = load_paths(list(files), stdin, namespace)
    except ManifestInvalid as exc:
        fail(str(exc))
    for warning in manifest.warnings:
        click.echo(f"Warning: {warning}", err=True)
    return manifest


def _kind(name: str):
    try:
        return kind_named(name)
    except UnknownKind as exc:
        fail(str(exc))


@click.command()
@click.option("-f", "--filename", "files", multiple=True, required=True,
              help="Manifest file, directory of manifests, or - for standard input.")
@namespace_option
@pass_target
def apply(target: Target, files: tuple[str, ...], namespace: str) -> None:
    """Create or update objects from Kubernetes YAML; a set with any bad object changes nothing."""
    manifest = _load(files, namespace)
    if not manifest.objects:
        fail("no objects passed to apply")

    async def run(client):
        try:
            return await apply_objects(client, manifest.objects)
        except ApplyFailed as exc:
            fail("\n".join(exc.problems))

    for applied in run_with_client(target, run):
        click.echo(f"{resource_name(applied.obj)} {applied.action}")


@click.command()
@click.argument("kind_name", metavar="KIND")
@click.argument("names", nargs=-1)
@namespace_option
@click.option("-A", "--all-namespaces", is_flag=True, help="List across all namespaces.")
@click.option("-o", "--output", type=click.Choice(["wide", "json", "yaml", "name"]), default=None)
@click.option("-l", "--selector", default="", help="Label selector, e.g. app=frontend.")
@click.option("--field-selector", default="", help="Field selector, e.g. spec.nodeName=node-1.")
@pass_target
def get(target: Target, kind_name: str, names: tuple[str, ...], namespace: str, all_namespaces: bool,
        output: str | None, selector: str, field_selector: str) -> None:
    """List objects of a kind (svc, po, deploy, no, ep), with kubectl's columns."""
    kind = _kind(kind_name)
    ns = "" if all_namespaces or not kind.namespaced else (namespace or "default")

    async def run(client):
        if names:
            return [await client.get(kind.name, n, ns) for n in names], ""
        return await client.list(kind.name, ns, selector, field_selector)

    objects, revision = run_with_client(target, run)
    if output in ("json", "yaml"):
        document = to_dict(objects[0]) if len(names) == 1 else as_list_document(objects, revision)
        click.echo(dump(document, output))
    elif output == "name":
        for obj in objects:
            click.echo(resource_name(obj))
    elif not objects:
        where = f" in {ns} namespace" if ns else ""
        click.echo(f"No resources found{where}.", err=True)
    else:
        click.echo(table(kind, objects, output == "wide", all_namespaces))


@click.command(name="describe")
@click.argument("kind_name", metavar="KIND")
@click.argument("names", nargs=-1)
@namespace_option
@pass_target
def describe_cmd(target: Target, kind_name: str, names: tuple[str, ...], namespace: str) -> None:
    """Show one object (or every one of a kind) in detail, with related objects."""
    kind = _kind(kind_name)
    ns = (namespace or "default") if kind.namespaced else ""

    async def run(client):
        objects = [await client.get(kind.name, n, ns) for n in names] if names else (await client.list(kind.name, ns))[0]
        out = []
        for obj in objects:
            related = {}
            if kind.name == "Service":
                related["EndpointSlice"], _ = await client.list(
                    "EndpointSlice", ns, f"{SERVICE_NAME_LABEL}={obj.metadata.name}"
                )
            elif kind.name == "Deployment":
                selector = ",".join(f"{k}={v}" for k, v in obj.spec.selector.match_labels.items())
                related["Pod"], _ = await client.list("Pod", ns, selector)
            elif kind.name == "Node":
                related["Pod"], _ = await client.list("Pod", "", "", f"spec.nodeName={obj.metadata.name}")
            out.append(describe(obj, related))
        return out

    click.echo("\n\n".join(run_with_client(target, run)))


@click.command()
@click.argument("kind_name", metavar="KIND", required=False)
@click.argument("names", nargs=-1)
@click.option("-f", "--filename", "files", multiple=True, help="Delete the objects a manifest names.")
@namespace_option
@click.option("--grace-period", type=int, default=None, help="Seconds a pod gets to stop; 0 deletes at once.")
@click.option("--ignore-not-found", is_flag=True)
@pass_target
def delete(target: Target, kind_name: str | None, names: tuple[str, ...], files: tuple[str, ...], namespace: str,
           grace_period: int | None, ignore_not_found: bool) -> None:
    """Delete objects by KIND NAME... or by -f FILE."""
    if files:
        if kind_name:
            fail("give either -f FILE or KIND NAME, not both")
        keys = [(kind_of(o).name, o.metadata.name, o.metadata.namespace) for o in _load(files, namespace).objects]
    else:
        if not kind_name or not names:
            fail("give KIND NAME... or -f FILE (e.g. `svclab delete svc frontend-service`)")
        kind = _kind(kind_name)
        keys = [(kind.name, n, namespace) for n in names]

    async def run(client):
        missing = []
        for kind, name, ns in keys:
            try:
                obj = await client.delete(kind, name, ns, grace_period)
                click.echo(f'{resource_name(obj).split("/")[0].split(".")[0]} "{name}" deleted')
            except NotFound as exc:
                if not ignore_not_found:
                    missing.append(f"Error from server (NotFound): {exc.message}")
        return missing

    missing = run_with_client(target, run)
    if missing:
        fail("\n".join(missing))


@click.command()
@click.argument("kind_name", metavar="KIND")
@click.argument("name")
@click.option("--replicas", type=click.IntRange(min=0), required=True)
@namespace_option
@pass_target
def scale(target: Target, kind_name: str, name: str, replicas: int, namespace: str) -> None:
    """Set a Deployment's replica count."""
    kind = _kind(kind_name)
    if kind.name != "Deployment":
        fail(f"cannot scale {kind.plural}: only deployments scale")

    async def run(client):
        for _ in range(10):
            deploy = await client.get("Deployment", name, namespace)
            deploy.spec.replicas = replicas
            try:
                return await client.update(deploy)
            except Conflict:
                continue
        raise ApiError(f"deployment {name!r} kept changing; try again")

    click.echo(f"{resource_name(run_with_client(target, run))} scaled")
