"""The node agent: what runs inside every node's namespace (the kubelet, pod networking,
cluster DNS, the built-in workloads, routes to other nodes' pods)."""
