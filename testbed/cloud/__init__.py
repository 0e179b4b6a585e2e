"""The cloud-controller: the cloud provider's side of LoadBalancer Services.

ipam.py allocates external IPs from the pool (pure); health.py health-checks nodes;
lb_table.py is the table format shared with the OpenFlow app (controller/), which
feed.py publishes to it; cloud_controller.py watches the API server and ties them together.
"""
