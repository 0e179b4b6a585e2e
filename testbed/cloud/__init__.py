"""The cloud-controller: the cloud provider's side of LoadBalancer Services.

ipam.py allocates external IPs from the pool (pure); health.py health-checks nodes;
feed.py publishes the load balancer table to the OpenFlow app (controller/);
controller.py watches the API server and ties them together.
"""
