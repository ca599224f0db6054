#!/usr/bin/env bash
# Remove the facility gateway installed by install/install.sh.
#
#   sudo install/uninstall.sh           remove the code, the units and the broker
#                                       configuration; keep the data and secrets
#   sudo install/uninstall.sh --purge   also delete /etc/facility-gateway (site
#                                       file, passwords, CA), /var/lib/facility-gateway
#                                       (the database) and the service user
#
# Mosquitto itself stays installed and goes back to Debian's configuration
# (remove it with 'apt-get purge mosquitto' if nothing else uses it).
# --root DIR works on a staging root made by install.sh --root DIR.
set -euo pipefail

SERVICE_USER=facility-gateway
APP=/opt/facility-gateway
CONF=/etc/facility-gateway
STATE=/var/lib/facility-gateway
BROKER=/etc/mosquitto/facility-gateway
UNITS=/etc/systemd/system

ROOT=""
PURGE=no
DONE=()

say() { printf '==> %s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }
at() { printf '%s%s' "$ROOT" "$1"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --purge) PURGE=yes; shift ;;
        --root) ROOT=$(realpath -m "$2"); shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) fail "unknown option '$1' (use --purge and/or --root DIR)" ;;
    esac
done
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    fail "run as root: sudo $0"
fi
systemd_running() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

if systemd_running; then
    systemctl disable --now facility-gateway.service >/dev/null 2>&1 || true
    DONE+=("stopped and disabled facility-gateway")
fi
rm -rf "$(at "$UNITS")/facility-gateway.service" "$(at "$UNITS")/facility-gateway.service.d" \
    "$(at "$UNITS")/mosquitto.service.d/facility-gateway.conf"
rmdir "$(at "$UNITS")/mosquitto.service.d" 2>/dev/null || true
DONE+=("removed facility-gateway.service and the drop-ins")

rm -rf "$(at "$APP")" "$(at "$BROKER")"
DONE+=("removed $APP and $BROKER")
if systemd_running; then
    systemctl daemon-reload
    systemctl restart mosquitto.service || true
    DONE+=("mosquitto runs on Debian's own configuration again")
fi

if [ "$PURGE" = yes ]; then
    rm -rf "$(at "$CONF")" "$(at "$STATE")"
    DONE+=("deleted $CONF and $STATE (--purge)")
    if [ -z "$ROOT" ] && id "$SERVICE_USER" >/dev/null 2>&1; then
        userdel "$SERVICE_USER"
        DONE+=("deleted the user $SERVICE_USER")
    fi
else
    DONE+=("kept $CONF (site file, passwords, CA) and $STATE (database); --purge deletes them")
fi

say "Done:"
printf '  - %s\n' "${DONE[@]}"
