#!/usr/bin/env bash
# Install or upgrade the facility gateway on Raspberry Pi OS (Debian Bookworm).
#
#   sudo install/install.sh --site my-ward.yaml     first install
#   sudo install/install.sh                         upgrade: run again from a newer copy
#
# Run from a copy of the repository. It is idempotent: a second run upgrades
# the code, re-renders the broker configuration from the site file and keeps
# every secret it made before. What it sets up:
#
#   /opt/facility-gateway            the code and its virtual environment
#   /etc/facility-gateway            site.yaml, broker-users, MQTT passwords, the CA
#   /var/lib/facility-gateway        the database (made by systemd on first start)
#   /etc/mosquitto/facility-gateway  the broker configuration (systemd/mosquitto/)
#   facility-gateway.service         the gateway, started at boot
#
# --root DIR stages everything under DIR instead and leaves the system alone
# (no packages, users, ownership or services): the tests use it.
set -euo pipefail

SOURCE=$(cd "$(dirname "$0")/.." && pwd)
SERVICE_USER=facility-gateway
APP=/opt/facility-gateway
CONF=/etc/facility-gateway
STATE=/var/lib/facility-gateway
BROKER=/etc/mosquitto/facility-gateway
UNITS=/etc/systemd/system
DEVICE_GROUPS=(gpio dialout bluetooth)  # GPIO pins, serial hubs, BlueZ over D-Bus
PACKAGES=(mosquitto openssl python3 python3-venv ca-certificates)

ROOT=""
SITE=""
LOCAL_PORT=1883
TLS_PORT=8883
WEBSOCKETS_PORT=""
RENEW_CERT=no
TLS_NAMES=()
EXTRA_USERS=()
PYTHON=${PYTHON:-python3}
GATEWAY_USER=""  # the gateway's MQTT user, as the site file names it
DONE=()    # what this run did, printed at the end
SKIPPED=() # what --root left out

usage() {
    cat <<EOF
usage: sudo $0 [--site FILE] [options]

  --site FILE          the site file to install (required the first time;
                       afterwards /etc/facility-gateway/site.yaml is used)
  --display NAME       add an MQTT user for a wall display (repeatable)
  --technician NAME    add an MQTT user for a technician's console (repeatable)
  --observer NAME      add a read-only MQTT user for diagnostics (repeatable)
  --websockets PORT    add a WebSockets+TLS listener for browser displays
  --mqtt-port PORT     loopback listener for the gateway (default 1883)
  --tls-port PORT      site-network TLS listener (default 8883)
  --tls-name NAME      a host name or IP address pagers use to reach this
                       gateway (repeatable; default: this host's name, its
                       .local name and its addresses)
  --renew-cert         issue a new server certificate from the site CA
  --root DIR           stage into DIR; touch no packages, users or services
EOF
}

say() { printf '==> %s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }
did() { DONE+=("$*"); }

# -- arguments ---------------------------------------------------------------

parse_arguments() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --site) SITE=$(realpath "$2"); shift 2 ;;
            --display) EXTRA_USERS+=("display $2"); shift 2 ;;
            --technician) EXTRA_USERS+=("technician $2"); shift 2 ;;
            --observer) EXTRA_USERS+=("observer $2"); shift 2 ;;
            --websockets) WEBSOCKETS_PORT=$2; shift 2 ;;
            --mqtt-port) LOCAL_PORT=$2; shift 2 ;;
            --tls-port) TLS_PORT=$2; shift 2 ;;
            --tls-name) TLS_NAMES+=("$2"); shift 2 ;;
            --renew-cert) RENEW_CERT=yes; shift ;;
            --root) ROOT=$(realpath -m "$2"); shift 2 ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; fail "unknown option '$1'" ;;
        esac
    done
}

# The path a file has in the staging root (the real path without --root).
at() { printf '%s%s' "$ROOT" "$1"; }

# set_owner OWNER:GROUP MODE PATH...: ownership only on a real install.
set_owner() {
    local owner=$1 mode=$2
    shift 2
    chmod "$mode" "$@"
    if [ -z "$ROOT" ]; then chown "$owner" "$@"; fi
}

# -- the system: packages, the service user ----------------------------------

check_system() {
    if [ -n "$ROOT" ]; then
        SKIPPED+=("apt packages, the service user, file ownership, systemctl")
        for tool in mosquitto mosquitto_passwd openssl "$PYTHON"; do
            command -v "$tool" >/dev/null || fail "--root needs '$tool' on this machine"
        done
        return
    fi
    [ "$(id -u)" -eq 0 ] || fail "run as root: sudo $0 $*"
    command -v apt-get >/dev/null || fail "this installer is for Debian and Raspberry Pi OS (no apt-get found)"
    if ! grep -qs 'VERSION_CODENAME=bookworm' /etc/os-release; then
        say "Warning: made for Debian/Raspberry Pi OS Bookworm; this is $(grep -s '^PRETTY_NAME=' /etc/os-release | cut -d= -f2-)"
    fi
}

install_packages() {
    [ -z "$ROOT" ] || return 0
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "Installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
        did "installed Debian packages: ${missing[*]}"
    fi
}

create_user() {
    [ -z "$ROOT" ] || return 0
    if ! id "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --user-group --home-dir "$STATE" --no-create-home \
            --shell /usr/sbin/nologin --comment "Facility gateway" "$SERVICE_USER"
        did "created the system user $SERVICE_USER"
    fi
    local present=()
    for group in "${DEVICE_GROUPS[@]}"; do
        if getent group "$group" >/dev/null; then
            present+=("$group")
        else
            say "Warning: no group '$group' on this system (not Raspberry Pi OS?); add it later with: usermod -aG $group $SERVICE_USER"
        fi
    done
    if [ ${#present[@]} -gt 0 ]; then
        usermod -aG "$(IFS=,; echo "${present[*]}")" "$SERVICE_USER"
        did "$SERVICE_USER is in groups: ${present[*]}"
    fi
}

# -- the code and its virtual environment --------------------------------------

install_code() {
    local app
    app=$(at "$APP")
    say "Installing the code into $APP"
    mkdir -p "$app"
    if [ "$(realpath "$app")" = "$SOURCE" ]; then
        fail "run install.sh from a new copy of the repository, not from $APP itself"
    fi
    # Replace the code, keep the virtual environment: an upgrade is a re-run.
    for item in main.py pyproject.toml README.md gateway drivers rules systemd sites install; do
        rm -rf "${app:?}/$item"
        cp -a "$SOURCE/$item" "$app/$item"
    done
    find "$app" -name __pycache__ -type d -prune -exec rm -rf {} +
    if [ ! -x "$app/.venv/bin/python" ]; then
        "$PYTHON" -m venv "$app/.venv"
        did "created the virtual environment $APP/.venv"
    fi
    # Exact pins come from pyproject.toml; pip is quiet unless it fails.
    if ! "$app/.venv/bin/python" -m pip install --disable-pip-version-check \
            --upgrade "$app" >"$app/.venv/pip.log" 2>&1; then
        cat "$app/.venv/pip.log" >&2
        fail "pip install failed; its output is above and in $APP/.venv/pip.log"
    fi
    rm -rf "$app/build" "$app"/*.egg-info
    did "installed the code and its pinned Python packages into $APP"
}

# -- configuration: the site file and who may use the broker -------------------

install_site() {
    local conf
    conf=$(at "$CONF")
    mkdir -p "$conf"
    set_owner "root:$SERVICE_USER" 0750 "$conf"
    if [ -n "$SITE" ]; then
        say "Checking $SITE"
        (cd "$(at "$APP")" && .venv/bin/python main.py check-config "$SITE") ||
            fail "the site file has problems (listed above); fix them and run again"
        install -m 0640 "$SITE" "$conf/site.yaml"
        set_owner "root:$SERVICE_USER" 0640 "$conf/site.yaml"
        did "installed the site file as $CONF/site.yaml"
    elif [ ! -f "$conf/site.yaml" ]; then
        fail "no site file yet: run again with --site FILE (sites/demo-ward.yaml is an example)"
    fi

    local users=$conf/broker-users
    if [ ! -f "$users" ]; then
        cat >"$users" <<'EOF'
# MQTT users the site file does not list, one '<role> <name>' per line.
# Roles: display (reads alerts, zones, silences), technician (silences,
# acks naming the staff member), observer (reads everything, for diagnostics).
# Devices and pagers come from site.yaml. Run install.sh again after editing.
display display-1
EOF
        did "created $CONF/broker-users with one wall display user, display-1"
    fi
    for entry in "${EXTRA_USERS[@]}"; do
        if ! grep -qx "$entry" "$users"; then
            echo "$entry" >>"$users"
            did "added MQTT user: $entry"
        fi
    done
    set_owner root:root 0644 "$users"
}

# -- the broker ----------------------------------------------------------------

render_broker() {
    local broker ws=()
    broker=$(at "$BROKER")
    mkdir -p "$broker/certs"
    [ -z "$WEBSOCKETS_PORT" ] || ws=(--websockets-port "$WEBSOCKETS_PORT")
    say "Rendering the Mosquitto configuration into $BROKER"
    (cd "$(at "$APP")" && .venv/bin/python -m gateway.broker_config render \
        --site "$(at "$CONF")/site.yaml" --extra-users "$(at "$CONF")/broker-users" \
        --out "$broker" --runtime-dir "$BROKER" \
        --local-port "$LOCAL_PORT" --tls-port "$TLS_PORT" "${ws[@]}") \
        >"$broker/users.new"
    mv "$broker/users.new" "$broker/users"
    set_owner root:root 0644 "$broker/mosquitto.conf" "$broker/users"
    set_owner root:mosquitto 0640 "$broker/acl"
    did "rendered $BROKER/mosquitto.conf and acl for $(wc -l <"$broker/users") MQTT users"
}

new_password() {
    # 24 characters from 18 random bytes, without characters that need quoting.
    head -c 18 /dev/urandom | base64 | tr '+/' '-_'
}

# Keep every password made before; make one for each new user; drop users
# no longer in the site file or broker-users.
write_passwords() {
    local conf broker credentials old made=0 kept=0
    conf=$(at "$CONF")
    broker=$(at "$BROKER")
    credentials=$conf/mqtt-credentials
    old=$(cat "$credentials" 2>/dev/null || true)
    local new_credentials="$credentials.new" plain="$broker/passwd.new"
    (umask 077 && : >"$new_credentials" && : >"$plain")
    {
        echo "# role user password: every MQTT user's password, for setting up"
        echo "# devices, pagers and displays. Kept on re-install; delete a line and"
        echo "# run install.sh again to give that user a new password."
    } >>"$new_credentials"
    while read -r role user; do
        local password
        password=$(awk -v u="$user" '$1 !~ /^#/ && $2 == u { print $3; exit }' <<<"$old")
        if [ -n "$password" ]; then kept=$((kept + 1)); else
            password=$(new_password)
            made=$((made + 1))
        fi
        echo "$role $user $password" >>"$new_credentials"
        echo "$user:$password" >>"$plain"
        if [ "$role" = gateway ]; then
            GATEWAY_USER=$user
            (umask 027 && printf '%s\n' "$password" >"$conf/mqtt-password.new")
        fi
    done <"$broker/users"
    [ -n "$GATEWAY_USER" ] || fail "the rendered user list has no gateway user"
    mosquitto_passwd -U "$plain"
    mv "$plain" "$broker/passwd"
    mv "$new_credentials" "$credentials"
    mv "$conf/mqtt-password.new" "$conf/mqtt-password"
    set_owner root:mosquitto 0640 "$broker/passwd"
    set_owner root:root 0600 "$credentials"
    set_owner "root:$SERVICE_USER" 0640 "$conf/mqtt-password"
    did "MQTT passwords: $made new, $kept kept ($CONF/mqtt-credentials, root only)"
}

tls_names() {
    if [ ${#TLS_NAMES[@]} -gt 0 ]; then
        printf '%s\n' "${TLS_NAMES[@]}"
        return
    fi
    local host
    host=$(hostname)
    printf '%s\n' "$host" "$host.local" localhost 127.0.0.1
    hostname -I 2>/dev/null | tr ' ' '\n' | grep -v '^$' || true
}

# The site's own CA (kept with the configuration, root only) signs the
# broker's certificate; pagers and displays trust the CA, so the server
# certificate can be renewed or given new names without touching them.
make_certificates() {
    local tls certs names san
    tls=$(at "$CONF")/tls
    certs=$(at "$BROKER")/certs
    mkdir -p "$tls"
    chmod 0700 "$tls"
    if [ ! -f "$tls/ca.key" ]; then
        openssl req -x509 -newkey rsa:3072 -nodes -days 7300 -sha256 \
            -subj "/CN=Facility gateway site CA $(hostname)" \
            -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>/dev/null
        chmod 0600 "$tls/ca.key"
        did "made the site CA ($CONF/tls/ca.crt, valid 20 years)"
    fi
    cp "$tls/ca.crt" "$certs/ca.crt"
    names=$(tls_names | sort -u)
    if [ "$RENEW_CERT" = no ] && [ -f "$certs/server.crt" ] &&
        [ "$names" = "$(cat "$certs/server.names" 2>/dev/null)" ] &&
        openssl x509 -checkend $((30 * 86400)) -noout -in "$certs/server.crt" >/dev/null; then
        :
    else
        san=$(while read -r name; do
            if [[ $name =~ ^[0-9.]+$|: ]]; then echo "IP:$name"; else echo "DNS:$name"; fi
        done <<<"$names" | paste -sd, -)
        openssl req -new -newkey rsa:2048 -nodes -subj "/CN=$(hostname)" \
            -keyout "$certs/server.key" -out "$certs/server.csr" 2>/dev/null
        openssl x509 -req -in "$certs/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" \
            -CAcreateserial -days 1825 -sha256 -out "$certs/server.crt" \
            -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san") 2>/dev/null
        rm -f "$certs/server.csr"
        echo "$names" >"$certs/server.names"
        did "issued the broker certificate for: $(echo "$names" | paste -sd' ' -) (5 years)"
    fi
    set_owner root:root 0644 "$certs/ca.crt" "$certs/server.crt" "$certs/server.names"
    set_owner root:mosquitto 0640 "$certs/server.key"
}

# -- systemd ---------------------------------------------------------------------

install_units() {
    local units
    units=$(at "$UNITS")
    mkdir -p "$units/facility-gateway.service.d" "$units/mosquitto.service.d"
    install -m 0644 "$SOURCE/systemd/facility-gateway.service" "$units/facility-gateway.service"
    install -m 0644 "$SOURCE/systemd/mosquitto/mosquitto-override.conf" \
        "$units/mosquitto.service.d/facility-gateway.conf"
    # The broker link as this installer set it up; it overrides the site
    # file's mqtt section (GATEWAY_<SECTION>__<KEY>, see README).
    cat >"$units/facility-gateway.service.d/mqtt.conf" <<EOF
# Written by install/install.sh: the gateway's link to the local broker.
[Service]
Environment=GATEWAY_MQTT__HOST=127.0.0.1
Environment=GATEWAY_MQTT__PORT=$LOCAL_PORT
Environment=GATEWAY_MQTT__USERNAME=$GATEWAY_USER
Environment=GATEWAY_MQTT__PASSWORD_FILE=$CONF/mqtt-password
EOF
    did "installed facility-gateway.service and drop-ins for it and mosquitto.service"
}

start_services() {
    if [ -n "$ROOT" ]; then return; fi
    if ! command -v systemctl >/dev/null; then
        say "Warning: systemd is not installed here; the services were neither enabled nor started"
        return
    fi
    if [ ! -d /run/systemd/system ]; then
        systemctl enable mosquitto.service facility-gateway.service >/dev/null 2>&1 || true
        did "enabled mosquitto and facility-gateway (systemd is not running here, so neither was started)"
        return
    fi
    systemctl daemon-reload
    systemctl enable mosquitto.service facility-gateway.service >/dev/null 2>&1
    systemctl restart mosquitto.service
    systemctl restart facility-gateway.service
    for unit in mosquitto facility-gateway; do
        if systemctl is-active --quiet "$unit"; then
            did "$unit is running"
        else
            say "Warning: $unit is not running; see: journalctl -u $unit -n 50"
        fi
    done
}

report() {
    echo
    say "Done. What this run did:"
    printf '  - %s\n' "${DONE[@]}"
    if [ ${#SKIPPED[@]} -gt 0 ]; then
        echo "  Left out (--root $ROOT):"
        printf '  - %s\n' "${SKIPPED[@]}"
    fi
    cat <<EOF

Next steps:
  - Pagers, displays and devices connect to port $TLS_PORT with TLS; give them
    the CA certificate $BROKER/certs/ca.crt and their own password from
    $CONF/mqtt-credentials (sudo cat it; a device's user is its device id,
    a pager's is the staff id).
  - The web page's technician password is set on its first visit: open the
    page and use the set-up code from: journalctl -u facility-gateway | grep -i setup
  - To upgrade, run this script again from a newer copy. To remove, run
    install/uninstall.sh (add --purge to delete the data and secrets too).
EOF
}

main() {
    parse_arguments "$@"
    check_system "$@"
    install_packages
    create_user
    install_code
    install_site
    render_broker
    write_passwords
    make_certificates
    install_units
    start_services
    report
}

main "$@"
