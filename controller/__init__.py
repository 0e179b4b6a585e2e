"""The cloud load balancer's data plane: an os-ken (OpenFlow 1.3) app on the edge bridge.

table.py is the desired state the cloud-controller publishes (plain JSON, no os-ken);
flows.py builds the OpenFlow rules from it (pure); balancer.py decides which node
gets a new connection and which rules change when the table does (pure, takes `now`);
lb_app.py is the thin os-ken app; main.py starts os-ken in-process.
"""
