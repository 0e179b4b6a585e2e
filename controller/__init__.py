"""The cloud load balancer's data plane: an os-ken (OpenFlow 1.3) app on the edge bridge.

It consumes the table the cloud-controller publishes (testbed/cloud/lb_table.py, plain
JSON); flows.py builds the OpenFlow rules from it (pure); balancer.py decides which node
gets a new connection and which rules change when the table does (pure, takes `now`);
osken_messages.py turns rules into os-ken messages and back; osken_app.py is the thin
os-ken app; launch.py starts os-ken in-process (`svclab lb-controller`).
"""
