#!/usr/bin/env bash
# Idempotent install step for svclab: Debian packages, the .venv, Debian's Mininet
# inside the venv, and a running Open vSwitch (started without systemd).
#
# Fast when nothing is missing: every step checks first and does nothing if done.
# Needs root (apt, OVS). Never touches the root namespace's firewall, routes or
# sysctls, and never runs `mn -c` or kills anything.
#
# Environment:
#   SVCLAB_PYTHON   interpreter for the venv (default: python3.11 / python3 on PATH,
#                   then ~/.pyenv/shims/python3); must be Python 3.11.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT=$(pwd)

APT_PACKAGES=(
    mininet openvswitch-switch iptables nftables ipvsadm ipset conntrack
    iproute2 iputils-ping ethtool curl socat bridge-utils
    # the stock-kernel VM tier (svclab vm): qemu, Debian's kernel with IP_VS, netem and the
    # openvswitch module, and busybox for the initramfs virtme-ng builds
    qemu-system-x86 linux-image-amd64 busybox-static
    # the Vagrant lab: make test runs `vagrant validate` on the Vagrantfile
    vagrant
)
VENV=.venv
MININET_SRC=/usr/lib/python3/dist-packages/mininet
OVS_CTL=/usr/share/openvswitch/scripts/ovs-ctl

say() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get and Open vSwitch need it)"

# --- a. Debian packages ---------------------------------------------------------
missing=()
# One dpkg-query for all packages; unknown packages print nothing on stdout.
installed=$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${APT_PACKAGES[@]}" 2>/dev/null || true)
for pkg in "${APT_PACKAGES[@]}"; do
    if ! grep -qE "^${pkg}(:[a-z0-9]+)? ii" <<<"$installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q </dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
fi
say "apt packages ok"

# --- b. venv with Python 3.11 ---------------------------------------------------
is_py311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; }

pick_python() {
    local c
    for c in ${SVCLAB_PYTHON:+"$SVCLAB_PYTHON"} python3.11 python3 "${PYENV_ROOT:-$HOME/.pyenv}/shims/python3"; do
        if command -v "$c" >/dev/null 2>&1 && is_py311 "$c"; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

# Reuse .venv if it runs Python 3.11 and was made here (a venv moved from another
# path has scripts whose #! lines point at the old path).
if [ -x "$VENV/bin/python" ] && is_py311 "$VENV/bin/python" \
        && [[ "$(head -n1 "$VENV/bin/pip" 2>/dev/null)" == "#!$REPO_ROOT/$VENV/bin/python"* ]]; then
    :
else
    PY=$(pick_python) || die "need Python 3.11 (pyenv's python3) on PATH, or set SVCLAB_PYTHON; python3 on PATH is: $({ python3 --version 2>&1 || true; } | head -n1)"
    if [ -e "$VENV" ]; then
        say "existing $VENV is not a working Python 3.11 venv: recreating it"
        rm -rf "$VENV"
    fi
    say "creating $VENV with $PY ($("$PY" --version 2>&1))"
    "$PY" -m venv "$VENV" || die "'$PY -m venv' failed (Debian's /usr/bin/python3 needs the python3-venv package; prefer pyenv's python3)"
fi

stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -e "$stamp" ]; then
    say "installing the project into $VENV (pip install -e '.[dev]')"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e '.[dev]' </dev/null
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi

# --- c. Debian's Mininet importable from the venv ---------------------------------
# Only Mininet itself goes on the path, not all of /usr/lib/python3/dist-packages
# (its old yaml, grpc, ... would shadow the venv's packages).
[ -d "$MININET_SRC" ] || die "$MININET_SRC missing (is Debian's mininet package installed?)"
# The .pth line is relative to site-packages: .venv/debian-mininet.
mn_dir="$VENV/debian-mininet"
site_packages="$VENV/lib/python3.11/site-packages"
pth="$site_packages/debian-mininet.pth"
pth_line="../../../debian-mininet"
[ -d "$site_packages" ] || die "no $site_packages in the venv"
if [ "$(readlink "$mn_dir/mininet" 2>/dev/null)" != "$MININET_SRC" ] \
        || [ "$(cat "$pth" 2>/dev/null)" != "$pth_line" ]; then
    mkdir -p "$mn_dir"
    ln -sfn "$MININET_SRC" "$mn_dir/mininet"
    echo "$pth_line" >"$pth"
fi
"$VENV/bin/python" -c 'import mininet.net' \
    || die "'import mininet.net' fails in $VENV (see $pth)"
say "venv ok ($VENV, $("$VENV/bin/python" --version 2>&1), mininet importable)"

# --- d. Open vSwitch, without systemd ---------------------------------------------
# Both daemons must answer: ovsdb-server (ovs-vsctl) and ovs-vswitchd (ovs-appctl).
# ovs-ctl start starts whichever of them is not running.
if ovs-vsctl -t 2 show >/dev/null 2>&1 \
        && ovs-appctl -T 2 -t ovs-vswitchd version >/dev/null 2>&1; then
    :
else
    say "starting Open vSwitch"
    # ovs-ctl daemonizes ovsdb-server and ovs-vswitchd; keep our stdout/stderr
    # (maybe a pipe) out of their hands so callers reading them do not hang.
    "$OVS_CTL" start --system-id=random </dev/null >/tmp/svclab-ovs-ctl.log 2>&1 \
        || { cat /tmp/svclab-ovs-ctl.log >&2; die "ovs-ctl start failed"; }
    { ovs-vsctl -t 5 show >/dev/null && ovs-appctl -T 5 -t ovs-vswitchd version >/dev/null; } \
        || { cat /tmp/svclab-ovs-ctl.log >&2; die "Open vSwitch started but ovs-vsctl cannot reach it"; }
fi
say "openvswitch running ($(ovs-vsctl -t 2 --version | head -n1))"
