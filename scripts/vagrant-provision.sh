#!/usr/bin/env bash
# Provisioning of the Vagrant lab (the Vagrantfile runs it as root in the guest): the very
# same install step as `make setup`, the stock kernel's modules loaded now and at every boot,
# and `svclab` on PATH for the vagrant user (through sudo, as everything svclab does needs root).
#
#   scripts/vagrant-provision.sh [--dry-run] [REPO]     (REPO: default /vagrant)
#
# --dry-run prints every step that would change the machine instead of taking it, after
# checking what can be checked here (the repository, the install step, the modules' names).
set -euo pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
REPO=${1:-/vagrant}
source "$(dirname "${BASH_SOURCE[0]}")/stock-kernel-modules.sh"
MODULES=("${STOCK_KERNEL_MODULES[@]}")
MODULES_CONF=/etc/modules-load.d/svclab.conf
BASE_PACKAGES=(make python3 python3-venv python3-pip sudo)

say() { echo "provision: $*"; }
step() {
    if [ "$DRY_RUN" = 1 ]; then echo "provision: would run: $*"; else "$@"; fi
}

[ -f "$REPO/scripts/setup.sh" ] || { echo "provision: ERROR: $REPO is not an svclab checkout" >&2; exit 1; }
bash -n "$REPO/scripts/setup.sh"
[ "$DRY_RUN" = 1 ] || [ "$(id -u)" -eq 0 ] || { echo "provision: ERROR: must run as root" >&2; exit 1; }

say "Debian packages the install step itself needs: ${BASE_PACKAGES[*]}"
export DEBIAN_FRONTEND=noninteractive
step apt-get update -q
step apt-get install -y -q --no-install-recommends "${BASE_PACKAGES[@]}"

say "the install step (make setup)"
step make -C "$REPO" setup

say "kernel modules, now and at boot: ${MODULES[*]}"
# A dry run checks the names against a Debian stock kernel installed here (linux-image-amd64)
stock=$(ls -d /lib/modules/*-amd64 2>/dev/null | sort -V | tail -n1 || true)
if [ "$DRY_RUN" = 1 ] && [ -n "$stock" ]; then
    for module in "${MODULES[@]}"; do
        modinfo -k "$(basename "$stock")" "$module" >/dev/null \
            || { echo "provision: ERROR: $(basename "$stock") has no module $module" >&2; exit 1; }
    done
    say "every module is in $(basename "$stock")"
fi
for module in "${MODULES[@]}"; do
    step modprobe "$module"
done
if [ "$DRY_RUN" = 1 ]; then
    echo "provision: would write $MODULES_CONF: ${MODULES[*]}"
else
    printf '%s\n' "${MODULES[@]}" >"$MODULES_CONF"
fi

say "svclab for the vagrant user: sudo svclab ... (and sudo make demo in $REPO)"
step ln -sfn "$REPO/.venv/bin/svclab" /usr/local/bin/svclab
say "done: vagrant ssh, then: cd $REPO && sudo make demo"
