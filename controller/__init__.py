"""The cloud load balancer's control plane: an os-ken (OpenFlow 1.3) app on the edge bridge.

It consumes the table the cloud-controller publishes (testbed/cloud/lb_table.py, plain
JSON) and programs the switch, which balances every connection itself (select groups,
connection tracking and NAT). flows.py builds the rules and groups from the table (pure);
balancer.py decides which of them change when the table or the switch does (pure);
osken_messages.py turns them into os-ken messages and back; osken_app.py is the thin
os-ken app; launch.py starts os-ken in-process (`svclab lb-controller`).
"""
