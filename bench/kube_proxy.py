"""kube-proxy backends at scale: render, full sync, partial sync, against the kernel's raw load.

    python -m bench.kube_proxy [--quick] [--repeat 2] [--shapes] [--no-record]

For 100, 1,000, 5,000 and 10,000 Services x 5 endpoints (--quick: 100 and 1,000), per mode:
- render: the renderer alone (warm name caches, best of two).
- backend: `backend.sync(state, None)` into a fresh namespace: what kube-proxy's first sync
  costs (iptables: hooks, render, iptables-restore, canary; nftables: render, nft -f, probe).
- raw: in the same run, the very same ruleset loaded by the tool alone into another fresh
  namespace (iptables-restore of the rendered document / nft -f of the rendered script), the
  kernel's and the tool's share; backend/raw is the price of the backend itself.
Best of --repeat runs each (the machine is shared: the minimum is the least disturbed).
Then, with the largest size loaded, one endpoint of one Service is replaced, ten times (ten
Services): the backend's partial sync (p50/min/max), the probe the server calls before each
sync (needs_full_sync), the raw apply of the same partial document/script in the raw
namespace, which holds the same table, and (nftables) the kernel's floor: the least
transaction that makes it re-validate the table (one new chain holding one jump).
--shapes: the nft load of 10,000-Service rulesets in several balancing shapes (see
testbed/proxy/nftables/), CPU time of nft (user+sys, less disturbed than wall time by other
load) and wall time, each in a fresh namespace.

Everything happens inside namespaces named kpb<pid>-*, entered by this thread (the tools are
forked from it) after checking it really left its own namespace, and deleted at the end, pass
or fail. Writes bench/results/kube_proxy.json and kube_proxy.png (unless --no-record).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from bench.common import RESULTS, print_table
from testbed.proxy import iptables as ipt
from testbed.proxy import nftables as nft
from testbed.proxy import backends
from testbed.proxy.model import Endpoint, ProxyState, ServicePort, ServicePortName
from testbed.node.podnet import entered_netns

PREFIX = f"kpb{os.getpid()}"
CLUSTER_CIDR = "10.244.0.0/16"
NODE = "node-a"
ENDPOINTS = 5
GOALS = {"ratio": 1.5, "partial_ms": {"iptables": 500, "nftables": 100}}
_counter = 0


# ------------------------------------------------------------------ namespaces


@contextmanager
def namespace(role: str) -> Iterator[str]:
    global _counter
    _counter += 1
    name = f"{PREFIX}-{_counter}-{role}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """This thread in namespace ns; refuses to go on if it did not leave its own."""
    own = os.stat("/proc/thread-self/ns/net").st_ino
    with entered_netns(ns):
        if os.stat("/proc/thread-self/ns/net").st_ino == own:
            raise RuntimeError(f"entering {ns} left the thread in its own namespace")
        yield


def run(argv: list[str], stdin: str) -> None:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr[:2000]}")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------ the workload


def make_state(services: int, endpoints: int = ENDPOINTS) -> ProxyState:
    state = ProxyState(NODE)
    for i in range(services):
        name = ServicePortName("bench", f"s{i}", "http", "TCP")
        state.services[name] = ServicePort(name, f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}", 80, "TCP")
        state.endpoints[name] = tuple(
            Endpoint(f"10.{244 + k // 65536}.{k // 256 % 256}.{k % 256}", 8080, f"n{k % 3}", is_local=k % 3 == 0)
            for k in range(i * endpoints, (i + 1) * endpoints))
    return state


def replace_endpoint(state: ProxyState, i: int, serial: int) -> ServicePortName:
    """Service i's first endpoint is replaced by a new pod (10.250.x.y)."""
    name = ServicePortName("bench", f"s{i}", "http", "TCP")
    first, *rest = state.endpoints[name]
    new = Endpoint(f"10.250.{serial // 256}.{serial % 256}", 8080, first.node_name, is_local=first.is_local)
    state.endpoints[name] = tuple(sorted([new, *rest], key=lambda e: e.addr))
    return name


class Mode:
    """One backend, and how to get at the ruleset it writes so the tool can load it alone."""

    def __init__(self, name: str) -> None:
        self.name = name

    def backend(self):
        return backends.create(self.name, backends.NodeSettings(NODE, CLUSTER_CIDR))

    def render(self, backend, state: ProxyState) -> object:
        if self.name == "iptables":
            return ipt.render(state, config=backend.config)
        return nft.render(state, config=backend.config)

    def raw_argv(self) -> list[str]:
        return ["iptables-restore", "-w", *ipt.RESTORE_FLAGS] if self.name == "iptables" else ["nft", "-f", "-"]

    def full_text(self, backend, state: ProxyState) -> tuple[str, object]:
        """The full sync's input exactly as the backend wrote it, and what raw partials need next."""
        if self.name == "iptables":
            result = ipt.render(state, config=backend.config)
            return result.document, result.programmed
        return backend.last_script, None

    def partial_text(self, backend, state: ProxyState, changed: set, raw_chains) -> tuple[str, object]:
        if self.name == "iptables":
            result = ipt.render(state, changed, raw_chains, backend.config)
            return result.document, result.programmed
        return backend.last_script, None


def rules_in(mode: str, text: str) -> int:
    if mode == "iptables":
        return sum(line.startswith("-A ") for line in text.splitlines())
    rules, in_chain = 0, False
    for line in text.splitlines():
        if line.startswith("add chain ") and line.endswith("{"):
            in_chain = True
        elif line == "}":
            in_chain = False
        elif in_chain:
            rules += 1
    return rules


# ------------------------------------------------------------------ measurements


def measure_mode(mode: Mode, sizes: list[int], repeat: int, changes: int) -> tuple[list[dict], dict]:
    full_rows: list[dict] = []
    partial: dict = {}
    for size in sizes:
        state = make_state(size)
        probe_backend = mode.backend()
        mode.render(probe_backend, state)  # name caches warm, as in a running kube-proxy
        render_s = min(timed(lambda: mode.render(probe_backend, state)) for _ in range(2))
        best_backend = best_raw = float("inf")
        text = ""
        for rep in range(repeat):
            last = rep == repeat - 1
            with namespace(f"{mode.name}-backend") as ns_backend, namespace(f"{mode.name}-raw") as ns_raw:
                backend = mode.backend()
                with inside(ns_backend):
                    best_backend = min(best_backend, timed(lambda: backend.sync(state, None)))
                text, raw_chains = mode.full_text(backend, state)
                with inside(ns_raw):
                    best_raw = min(best_raw, timed(lambda: run(mode.raw_argv(), text)))
                if last and size == sizes[-1]:
                    partial = measure_partial(mode, backend, state, ns_backend, ns_raw, raw_chains, changes)
                    partial["services"] = size
        row = {"mode": mode.name, "services": size, "endpoints": size * ENDPOINTS, "rules": rules_in(mode.name, text),
               "render_s": render_s, "backend_s": best_backend, "raw_s": best_raw, "ratio": best_backend / best_raw}
        full_rows.append(row)
        print(f"  {mode.name} {size}: render {render_s:.2f} s, backend {best_backend:.2f} s, raw {best_raw:.2f} s",
              flush=True)
    return full_rows, partial


def measure_partial(mode: Mode, backend, state: ProxyState, ns_backend: str, ns_raw: str, raw_chains,
                    changes: int) -> dict:
    sync_ms, probe_ms, raw_ms, floor_ms, lines = [], [], [], [], []
    for k in range(changes):
        changed = {replace_endpoint(state, 77 + 97 * k, k + 1)}
        with inside(ns_backend):
            probe_ms.append(timed(backend.needs_full_sync) * 1000)
            sync_ms.append(timed(lambda: backend.sync(state, changed)) * 1000)
        text, raw_chains = mode.partial_text(backend, state, changed, raw_chains)
        lines.append(len(text.splitlines()))
        with inside(ns_raw):
            raw_ms.append(timed(lambda: run(mode.raw_argv(), text)) * 1000)
            if mode.name == "nftables":  # the least transaction that makes the kernel re-validate the table
                floor = f"add chain ip kube-proxy floor-{k} {{ jump {nft.MARK_MASQ} ; }}\n"
                floor_ms.append(timed(lambda: run(["nft", "-f", "-"], floor)) * 1000)
    return {"mode": mode.name, "changes": changes, "sync_ms": sync_ms, "probe_ms": probe_ms, "raw_ms": raw_ms,
            "p50_ms": statistics.median(sync_ms), "min_ms": min(sync_ms), "max_ms": max(sync_ms),
            "probe_p50_ms": statistics.median(probe_ms), "raw_p50_ms": statistics.median(raw_ms),
            "floor_ms": floor_ms, "floor_p50_ms": statistics.median(floor_ms) if floor_ms else None,
            "lines_p50": statistics.median(lines)}


# ------------------------------------------------------------------ balancing shapes (--shapes)

_DNAT = re.compile(r"^\t(numgen random mod \d+ == 0 )?meta l4proto (\w+) dnat to ([\d.]+):(\d+)$")


def shape_script(shape: str, state: ProxyState) -> str:
    """The full first-sync script with the per-Service balancing written in one shape:
    inline (svclab's: the cascade DNATing itself, hairpin by set), chains (the cascade jumping
    to upstream's endpoint chains), anon (upstream's: endpoint chains and a numgen vmap),
    named (a named map per Service), offset (one shared map keyed by `numgen … offset K`),
    goto (first endpoint chain only: no balancing, a lower bound)."""
    inline = nft.render(state, config=nft.Config(cluster_cidr=CLUSTER_CIDR)).script
    if shape == "inline":
        return inline
    out, endpoint_blocks, maps, cascade, chain = [], {}, [], [], ""
    shared, offset, first_service_chain = [], 0, None

    def flush_cascade() -> None:
        nonlocal offset
        if not cascade:
            return
        targets = list(cascade)
        cascade.clear()
        n = len(targets)
        choices = ", ".join(f"{i} : goto {t}" for i, t in enumerate(targets))
        if shape == "chains":
            out.extend(f"\tnumgen random mod {n - i} == 0 goto {t}" if i < n - 1 else f"\tgoto {t}"
                       for i, t in enumerate(targets))
        elif shape == "goto":
            out.append(f"\tgoto {targets[0]}")
        elif shape == "anon":
            out.append(f"\tnumgen random mod {n} vmap {{ {choices} }}")
        elif shape == "named":
            name = "lb-" + chain.split("-", 1)[1]
            maps.append(f"add map ip kube-proxy {name} {{ typeof numgen random mod 1 : verdict ; "
                        f"elements = {{ {choices} }} ; }}")
            out.append(f"\tnumgen random mod {n} vmap @{name}")
        elif shape == "offset":
            shared.extend(f"{offset + i} : goto {t}" for i, t in enumerate(targets))
            out.append(f"\tnumgen random mod {n} offset {offset} vmap @service-endpoints")
            offset += n

    for line in inline.splitlines():
        if line.startswith("add chain ip kube-proxy ") and line.endswith("{"):
            chain = line.split()[4]
        m = _DNAT.match(line)
        if m:
            proto, ip, port = m[2], m[3], m[4]
            target = f"endpoint-{chain.split('-', 1)[1]}__{ip}/{port}"[:250]
            endpoint_blocks[target] = (f"add chain ip kube-proxy {target} {{\n\tip saddr {ip} jump "
                                       f"{nft.MARK_MASQ}\n\tmeta l4proto {proto} dnat to {ip}:{port}\n}}")
            cascade.append(target)
            continue
        flush_cascade()
        if first_service_chain is None and line.startswith("add chain ip kube-proxy ") \
                and nft.is_service_chain(line.split()[4]):
            first_service_chain = len(out)
        out.append(line)
    # endpoint chains (and maps naming them) before the first chain that jumps to them
    out[first_service_chain:first_service_chain] = list(endpoint_blocks.values()) + maps
    if shape == "offset":
        out.insert(3, "add map ip kube-proxy service-endpoints { typeof numgen random mod 1 : verdict ; }")
        out.append("add map ip kube-proxy service-endpoints { typeof numgen random mod 1 : verdict ; elements = { "
                   + ", ".join(shared) + " } ; }")
    return "\n".join(out) + "\n"


def measure_shapes(sizes: list[int]) -> list[dict]:
    rows = []
    for size in sizes:
        state = make_state(size)
        for shape in ("inline", "goto", "chains", "named", "anon", "offset"):
            if shape in ("anon", "offset") and size > 4000:
                continue  # quadratic: minutes at 10,000
            script = shape_script(shape, state)
            with namespace(f"shape-{shape}") as ns, inside(ns):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                wall = timed(lambda: run(["nft", "-f", "-"], script))
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                # what any later transaction adding a jump or DNAT pays: the kernel re-validates
                # the table from every base chain (best of three)
                floor = min(timed(lambda: run(["nft", "-f", "-"], f"add chain ip kube-proxy floor-{k} "
                                                                  f"{{ jump {nft.MARK_MASQ} ; }}\n"))
                            for k in range(3))
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            sys_s = after.ru_stime - before.ru_stime
            rows.append({"shape": shape, "services": size, "wall_s": wall, "cpu_s": cpu, "kernel_s": sys_s,
                         "floor_ms": floor * 1000, "lines": script.count("\n")})
            print(f"  {shape} {size}: wall {wall:.2f} s, nft cpu {cpu:.2f} s (kernel {sys_s:.2f} s), "
                  f"re-validation {floor * 1000:.0f} ms", flush=True)
    return rows


# ------------------------------------------------------------------ report


def plot(full: list[dict], partials: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    colors = {"iptables": "tab:orange", "nftables": "tab:blue"}
    for mode in ("iptables", "nftables"):
        rows = [r for r in full if r["mode"] == mode]
        if not rows:
            continue
        x = [r["services"] for r in rows]
        left.plot(x, [r["backend_s"] for r in rows], "o-", color=colors[mode], label=f"{mode}: backend full sync")
        left.plot(x, [r["raw_s"] for r in rows], "s--", color=colors[mode], alpha=0.6,
                  label=f"{mode}: raw load of the same rules")
        left.plot(x, [r["render_s"] for r in rows], ":", color=colors[mode], alpha=0.6, label=f"{mode}: render")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel(f"Services ({ENDPOINTS} endpoints each)")
    left.set_ylabel("seconds")
    left.set_title("Full sync into a fresh namespace")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    modes = [p["mode"] for p in partials]
    xs = range(len(modes))
    right.bar([i - 0.2 for i in xs], [p["p50_ms"] for p in partials], 0.4, label="backend partial sync (p50)",
              color=[colors[m] for m in modes])
    right.bar([i + 0.2 for i in xs], [p["raw_p50_ms"] for p in partials], 0.4, label="raw apply (p50)",
              color=[colors[m] for m in modes], alpha=0.5)
    for i, p in enumerate(partials):
        if p.get("floor_p50_ms") is not None:
            right.hlines(p["floor_p50_ms"], i - 0.45, i + 0.45, colors="black", linestyles="dotted",
                         label="kernel re-validation floor")
    for i, p in enumerate(partials):
        right.hlines(GOALS["partial_ms"][p["mode"]], i - 0.45, i + 0.45, colors="red", linestyles="dashed")
    right.set_xticks(list(xs), modes)
    right.set_ylabel("ms")
    services = partials[0]["services"] if partials else 0
    right.set_title(f"One endpoint change, {services:,} Services present\n(red: goal)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 Services only")
    parser.add_argument("--repeat", type=int, default=2, help="full syncs per size and mode (best is kept)")
    parser.add_argument("--changes", type=int, default=10, help="endpoint changes for the partial sync")
    parser.add_argument("--modes", default="iptables,nftables")
    parser.add_argument("--shapes", action="store_true", help="also compare nft balancing shapes")
    parser.add_argument("--shape-sizes", default="1000,4000,10000")
    parser.add_argument("--no-record", action="store_true", help="do not write bench/results")
    args = parser.parse_args()
    sizes = [100, 1000] if args.quick else [100, 1000, 5000, 10000]
    started = time.time()
    load_before = os.getloadavg()
    full: list[dict] = []
    partials: list[dict] = []
    for name in filter(None, args.modes.split(",")):
        print(f"{name}:", flush=True)
        rows, partial = measure_mode(Mode(name), sizes, args.repeat, args.changes)
        full += rows
        partials.append(partial)
    shapes = measure_shapes([int(s) for s in args.shape_sizes.split(",")]) if args.shapes else []
    load_after = os.getloadavg()

    tables = [] if not full else [print_table(
        f"\nFull sync, {ENDPOINTS} endpoints per Service (best of {args.repeat}; goal at {sizes[-1]:,}: "
        f"backend/raw <= {GOALS['ratio']}x)",
        ["mode", "Services", "rules", "render s", "backend full sync s", "raw load s", "backend/raw"],
        [[r["mode"], f"{r['services']:,}", f"{r['rules']:,}", f"{r['render_s']:.2f}", f"{r['backend_s']:.2f}",
          f"{r['raw_s']:.2f}", f"{r['ratio']:.2f}x"] for r in full])]
    tables += [] if not partials else [print_table(
        f"\nOne endpoint change with {sizes[-1]:,} Services present ({args.changes} changes; goal "
        + ", ".join(f"{m} <= {g} ms" for m, g in GOALS["partial_ms"].items()) + ")",
        ["mode", "partial sync p50 ms", "min ms", "max ms", "probe p50 ms", "raw apply p50 ms",
         "kernel re-validation floor p50 ms", "lines"],
        [[p["mode"], f"{p['p50_ms']:.0f}", f"{p['min_ms']:.0f}", f"{p['max_ms']:.0f}", f"{p['probe_p50_ms']:.1f}",
          f"{p['raw_p50_ms']:.0f}", "-" if p["floor_p50_ms"] is None else f"{p['floor_p50_ms']:.0f}",
          f"{p['lines_p50']:,.0f}"] for p in partials])]
    if shapes:
        tables.append(print_table(
            f"\nnft -f of the first sync, {ENDPOINTS} endpoints per Service, by balancing shape "
            "(fresh namespace; nft CPU = user + kernel time of the nft process)",
            ["shape", "Services", "wall s", "nft CPU s", "of which kernel s", "then: re-validation floor ms"],
            [[r["shape"], f"{r['services']:,}", f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}", f"{r['kernel_s']:.2f}",
              f"{r['floor_ms']:.0f}"] for r in shapes]))
    print(f"\nload average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end "
          f"({os.cpu_count()} CPUs); {time.time() - started:.0f} s in all", flush=True)
    if args.no_record:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "kernel": platform.release(), "cpus": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": load_after, "endpoints_per_service": ENDPOINTS,
        "repeat": args.repeat, "goals": GOALS, "full": full, "partial": partials, "shapes": shapes,
        "nft": subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip(),
        "iptables": subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout.strip(),
        "tables": tables,
    }
    (RESULTS / "kube_proxy.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(full, partials, RESULTS / "kube_proxy.png")
    print(f"wrote {RESULTS / 'kube_proxy.json'} and {RESULTS / 'kube_proxy.png'}")


if __name__ == "__main__":
    main()
