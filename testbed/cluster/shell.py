"""The interactive shell of a foreground `svclab up`: Mininet's CLI, with pods too.

    svclab> client curl -s http://node1:30007
    svclab> frontend-7c9f6-x2kqp ip addr
    svclab> node2 ping -c1 frontend-7c9f6-x2kqp
    svclab> svclab get pods -o wide

The first word names a node (node1..), the client, the router (gw) or a pod
(in the default namespace); the command runs in its network namespace (pods
with their resolv.conf). Later words that name a node, the client or a pod are
replaced by its address, as Mininet does. Mininet's own commands (nodes, net,
dump, links, pingall, ...) work as usual; `exit` or Ctrl-D tears the cluster down.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

from mininet.cli import CLI

from testbed.client.client import ApiClient
from testbed import naming


class ClusterShell(CLI):
    prompt = "svclab> "

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.network = cluster.network
        self._ran = False

    def run(self) -> None:
        if self._ran:
            return super().run()
        self._ran = True
        print("Type `help` for Mininet's commands; `<node|client|pod> <command>` runs a command there; "
              "`svclab <verb> ...` runs the CLI; `exit` tears the cluster down.", file=sys.stderr)
        CLI.__init__(self, self.network.mininet)

    def _pods(self) -> dict[str, tuple[str, str]]:
        async def fetch():
            async with ApiClient.for_state_dir(self.cluster.state) as client:
                pods, _ = await client.list("Pod", "default")
                return {p.metadata.name: (p.metadata.uid, p.status.pod_ip) for p in pods}
        return asyncio.run(fetch())

    def _addresses(self, pods: dict[str, tuple[str, str]]) -> dict[str, str]:
        out = dict(self.network.node_ips)
        out["client"] = self.network.client_ip
        out.update({name: ip for name, (_, ip) in pods.items() if ip})
        return out

    def do_svclab(self, line: str) -> None:
        """Run an svclab CLI command on this cluster: svclab get pods -o wide"""
        subprocess.run([sys.executable, "-m", "testbed", "--state-dir", str(self.cluster.state.path), *line.split()])

    def default(self, line: str) -> None:
        first, args, line = self.parseline(line)
        pods = self._pods()
        if first in self.network.host_names:
            netns = self.network.netns(first)
        elif first in pods:
            netns = naming.pod_netns(self.cluster.config.name, pods[first][0])
        else:
            return super().default(line)
        if not args:
            print(f"*** give a command to run in {first}", file=sys.stderr)
            return
        addresses = self._addresses(pods)
        argv = [addresses.get(word, word) for word in args.split()]
        subprocess.run(["ip", "netns", "exec", netns, *argv])
