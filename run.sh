#!/usr/bin/env bash
# Set up everything on a fresh Debian / Raspberry Pi OS machine, then either
# run the gateway on a simulated ward or run the whole test suite.
#
#   ./run.sh demo [demo options]   the gateway on a simulated ward (Ctrl-C stops)
#   ./run.sh test [pytest options] lint + the whole test suite
#
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PYTHON=${PYTHON:-python3}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Install Debian packages that are missing; apt-get update only if needed.
apt_install() {
    local missing=()
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null; then
        say "Please install these packages with your package manager: ${missing[*]}"
        exit 1
    fi
    say "Installing ${missing[*]} (Debian packages)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
}

need_command() {  # need_command BINARY PACKAGE
    command -v "$1" >/dev/null 2>&1 || apt_install "$2"
}

setup_python() {
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        say "Python 3.11 or newer is needed (Raspberry Pi OS Bookworm ships 3.11)"
        exit 1
    fi
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
    if [ ! -x "$VENV/bin/python" ]; then
        say "Creating the virtual environment in $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    say "Installing Python packages (pinned in pyproject.toml)"
    # The build backend is chatty; show its output only when it fails.
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -e ".$1" \
            >"$VENV/pip.log" 2>&1; then
        cat "$VENV/pip.log" >&2
        say "pip install failed; its output is above and in $VENV/pip.log"
        exit 1
    fi
}

# ESPHome validates the device configurations in firmware-config/ offline. It
# lives in a venv of its own: it pins versions of its own that must not move
# the gateway's.
setup_esphome() {
    local venv=.venv-esphome
    if [ ! -x "$venv/bin/esphome" ]; then
        say "Installing ESPHome into $venv (validates firmware-config/)"
        "$PYTHON" -m venv "$venv"
        if ! "$venv/bin/python" -m pip install --disable-pip-version-check \
                esphome==2026.6.5 >"$venv/pip.log" 2>&1; then
            cat "$venv/pip.log" >&2
            say "ESPHome install failed; its output is above"
            exit 1
        fi
    fi
    export ESPHOME="$PWD/$venv/bin/esphome"
}

case "${1:-}" in
    demo)
        shift
        need_command mosquitto mosquitto
        need_command mosquitto_passwd mosquitto
        setup_python ""
        exec "$VENV/bin/python" main.py demo "$@"
        ;;
    test)
        shift
        need_command mosquitto mosquitto
        need_command mosquitto_passwd mosquitto
        need_command g++ g++
        # The shipped broker's TLS listener gets a throwaway certificate
        # (tests/test_broker_acl.py); shellcheck lints this script and the
        # installer (below, and in tests/test_install.py).
        need_command openssl openssl
        need_command shellcheck shellcheck
        # tests/test_systemd.py runs `systemd-analyze verify` and `security`
        # on the unit; Debian ships them in the systemd package.
        need_command systemd-analyze systemd
        # tests/test_browser.py drives Debian's Chromium with Playwright (never
        # Playwright's own browser downloads); DejaVu gives it a font to draw.
        need_command chromium chromium
        apt_install fonts-dejavu-core
        setup_python "[test]"
        setup_esphome
        say "Lint (ruff)"
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        say "Lint (shellcheck)"
        shellcheck run.sh install/*.sh
        say "Tests (pytest)"
        # The browser tests' screenshots are kept here, for CI to collect.
        export GATEWAY_TEST_ARTIFACTS="${GATEWAY_TEST_ARTIFACTS:-$PWD/test-artifacts}"
        echo "Browser screenshots go to $GATEWAY_TEST_ARTIFACTS/browser"
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: ./run.sh demo|test [options]" >&2
        exit 2
        ;;
esac
