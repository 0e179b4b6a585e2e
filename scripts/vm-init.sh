#!/usr/bin/env bash
# Runs first inside the stock-kernel VM (svclab vm): loads what this kernel has as modules
# and the host's kernel lacks, starts the guest's own Open vSwitch (on the kernel datapath),
# then runs the command it was given. Everything here lives in the VM's overlays.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/stock-kernel-modules.sh"
for module in "${STOCK_KERNEL_MODULES[@]}"; do
    modprobe "$module" || echo "vm-init: modprobe $module failed" >&2
done

# cgroup2, as a systemd host has it (the kubelet's pod cgroups)
if ! mountpoint -q /sys/fs/cgroup; then
    mount -t cgroup2 none /sys/fs/cgroup
fi

# The host's OVS database is copied into the overlay: start from an empty one of our own.
rm -f /etc/openvswitch/conf.db /etc/openvswitch/.conf.db.~lock~
/usr/share/openvswitch/scripts/ovs-ctl start --system-id=random </dev/null >/tmp/vm-init-ovs.$$.log 2>&1 \
    || { cat /tmp/vm-init-ovs.$$.log >&2; echo "vm-init: ovs-ctl start failed" >&2; exit 2; }
rm -f /tmp/vm-init-ovs.$$.log

exec "$@"
