"""The launcher behind `svclab up`: cluster config, the Mininet network (topo.py: names and
layout, net.py: building it, netclean.py: removing what a dead cluster left), the cluster's
processes, the cloud load balancer's processes, and the interactive shell."""
