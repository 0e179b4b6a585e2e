"""Start the os-ken app in-process (os-ken 4.x ships no osken-manager).

os-ken listens for the switch on 127.0.0.1:<port> of the root namespace, where
ovs-vswitchd runs; `svclab up` picks a free port and records it. (A Unix socket
would be nicer but OVS connects to Unix-socket controllers only under its own
run directory, and os-ken sets TCP options on every switch socket.)
"""

from __future__ import annotations

import logging

from os_ken.base import app_manager  # first: it sets up os-ken's configuration and hub

from controller.osken_app import LoadBalancerApp, Settings


def run(openflow_port: int, settings: Settings) -> None:
    from os_ken import cfg

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg.CONF(args=["--ofp-listen-host", "127.0.0.1", "--ofp-tcp-listen-port", str(openflow_port)],
             project="os_ken")
    LoadBalancerApp.settings = settings
    app_manager.AppManager.run_apps([LoadBalancerApp.__module__])
