"""install/install.sh and uninstall.sh, run for real into a staging root.

``--root DIR`` installs everything under DIR and leaves out what needs the
real system: Debian packages, the service user, file ownership and systemctl.
The rest runs as on a Pi: the code is copied, its virtual environment is made
with the pinned packages (from PyPI or pip's cache), the site file is checked,
the broker configuration rendered, every secret and the site CA generated.
The staged Mosquitto configuration is then started, with its paths pointed
into DIR, and the staged gateway connects to it with the installed password.
"""

from __future__ import annotations

import os
import shutil
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.broker import free_port, port_answers
from tests.helpers import ROOT, MqttClient, site_config, write_site

INSTALL = ROOT / "install" / "install.sh"
UNINSTALL = ROOT / "install" / "uninstall.sh"
SITE = "install-test"
BROKER = Path("etc/mosquitto/facility-gateway")
CONF = Path("etc/facility-gateway")
APP = Path("opt/facility-gateway")


def run(*command: str | Path) -> str:
    """Run a script; on failure show everything it printed."""
    done = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One staged install, shared: making its virtual environment takes ~20 s."""
    folder = tmp_path_factory.mktemp("install")
    site = write_site(folder / "site.yaml", site_config(SITE))
    ports = SimpleNamespace(local=free_port(), tls=free_port(), ws=free_port())
    root = folder / "root"
    output = run(
        INSTALL, "--root", root, "--site", site,
        "--mqtt-port", ports.local, "--tls-port", ports.tls,
        "--websockets", ports.ws, "--display", "wall-1",
    )  # fmt: skip
    return SimpleNamespace(root=root, ports=ports, output=output, site=site)


def credentials(root: Path) -> dict[str, tuple[str, str]]:
    """user -> (role, password), from the root-only credentials file."""
    found = {}
    for line in (root / CONF / "mqtt-credentials").read_text().splitlines():
        if line and not line.startswith("#"):
            role, user, password = line.split()
            found[user] = (role, password)
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_scripts_are_valid_bash_and_pass_shellcheck():
    for script in (INSTALL, UNINSTALL):
        run("bash", "-n", script)
    assert shutil.which("shellcheck"), (
        "shellcheck is missing: ./run.sh test installs it"
    )
    run("shellcheck", INSTALL, UNINSTALL)


def test_install_generates_a_password_per_user_and_keeps_secrets_private(staged):
    """Every user gets a random password of its own; secret files stay private."""
    found = credentials(staged.root)
    devices = [f"call-{n}" for n in range(1, 5)]
    staff = ["ana", "ben", "chloe", "dev"]
    assert {user: role for user, (role, _) in found.items()} == {
        "gateway": "gateway",
        **dict.fromkeys(devices, "device"),
        **dict.fromkeys(staff, "pager"),
        "display-1": "display",
        "wall-1": "display",
    }
    passwords = [password for _, password in found.values()]
    assert len(set(passwords)) == len(passwords)
    assert all(len(password) >= 24 for password in passwords)
    gateway_password = (staged.root / CONF / "mqtt-password").read_text().strip()
    assert gateway_password == found["gateway"][1]

    hashed = (staged.root / BROKER / "passwd").read_text()
    assert all(password not in hashed for password in passwords)
    assert mode(staged.root / CONF / "mqtt-credentials") == 0o600
    assert mode(staged.root / CONF / "tls" / "ca.key") == 0o600
    assert mode(staged.root / CONF / "tls") == 0o700
    for private in ("passwd", "acl", "certs/server.key"):
        assert mode(staged.root / BROKER / private) == 0o640, private
    assert mode(staged.root / CONF / "mqtt-password") == 0o640
    drop_in = staged.root / "etc/systemd/system/facility-gateway.service.d/mqtt.conf"
    assert f"GATEWAY_MQTT__PORT={staged.ports.local}\n" in drop_in.read_text()
    assert "Left out (--root" in staged.output


@pytest.fixture
def staged_broker(staged, tmp_path: Path) -> Iterator[Path]:
    """Mosquitto on the staged configuration, its paths pointed into the root.

    Only the file paths, the run user and the log destination are changed;
    listeners, limits, passwords, ACL and certificates are the installed ones.
    """
    text = (staged.root / BROKER / "mosquitto.conf").read_text()
    text = text.replace(f"/{BROKER}/", f"{staged.root / BROKER}/")
    text = text.replace("user mosquitto", f"user {os.environ.get('USER', 'root')}")
    log_file = tmp_path / "mosquitto.log"
    text = text.replace("log_dest stderr", f"log_dest file {log_file}")
    config = tmp_path / "mosquitto.conf"
    config.write_text(text)
    process = subprocess.Popen(["mosquitto", "-c", str(config)])
    try:
        ports = vars(staged.ports).values()
        deadline = time.monotonic() + 10
        while not all(port_answers("127.0.0.1", port) for port in ports):
            assert process.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, "staged mosquitto did not listen"
            time.sleep(0.05)
        yield log_file
    finally:
        process.kill()
        process.wait()


def tls_connect(staged, user: str, password: str) -> str:
    """CONNACK of one TLS connection checked against the installed site CA."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.username_pw_set(user, password)
    client.tls_set(
        ca_certs=str(staged.root / BROKER / "certs" / "ca.crt"),
        tls_version=ssl.PROTOCOL_TLS_CLIENT,
    )
    reasons: list[str] = []
    client.on_connect = lambda c, u, f, reason, p: reasons.append(str(reason))
    client.connect("localhost", staged.ports.tls, keepalive=10)
    client.loop_start()
    deadline = time.monotonic() + 5
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.02)
    client.disconnect()
    client.loop_stop()
    return reasons[0] if reasons else "no CONNACK"


def test_installed_broker_and_gateway_work_together(staged, staged_broker, tmp_path):
    """Devices log in over TLS with their installed password; the gateway connects."""
    found = credentials(staged.root)
    assert tls_connect(staged, "call-1", found["call-1"][1]) == "Success"
    assert tls_connect(staged, "call-1", found["call-2"][1]) == "Not authorized"
    assert tls_connect(staged, "wall-1", found["wall-1"][1]) == "Success"

    observer_broker = SimpleNamespace(
        host="127.0.0.1",
        port=staged.ports.local,
        passwords={"gateway": found["gateway"][1]},
    )
    watcher = MqttClient(observer_broker, "gateway")  # type: ignore[arg-type]
    watcher.subscribe(f"facility/{SITE}/gateways/gw-1/status")
    app = staged.root / APP
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_MQTT__HOST="127.0.0.1",
        GATEWAY_MQTT__PORT=str(staged.ports.local),
        GATEWAY_MQTT__USERNAME="gateway",
        GATEWAY_MQTT__PASSWORD_FILE=str(staged.root / CONF / "mqtt-password"),
        GATEWAY_DATABASE__PATH=str(tmp_path / "gateway.db"),
        GATEWAY_WEB__PORT=str(free_port()),
    )
    log = (tmp_path / "gateway.log").open("wb")
    gateway = subprocess.Popen(
        [app / ".venv/bin/python", app / "main.py", "run", "--config",
         staged.root / CONF / "site.yaml"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        watcher.wait_for(lambda m: m.payload == b"online", timeout=60)
    except AssertionError:
        log.flush()
        raise AssertionError((tmp_path / "gateway.log").read_text()[-5000:]) from None
    finally:
        gateway.terminate()
        gateway.wait(timeout=20)
        watcher.close()
        log.close()


def test_running_again_upgrades_and_keeps_every_secret(staged, tmp_path):
    """A second run replaces the code, adds new users and changes no secret."""
    root = tmp_path / "root"
    shutil.copytree(staged.root, root, symlinks=True)
    stale = root / APP / "gateway" / "left_over_from_an_old_version.py"
    stale.write_text("")
    before = credentials(root)
    ca = (root / CONF / "tls" / "ca.crt").read_bytes()
    server = (root / BROKER / "certs" / "server.crt").read_bytes()

    output = run(
        INSTALL, "--root", root, "--mqtt-port", staged.ports.local,
        "--tls-port", staged.ports.tls, "--websockets", staged.ports.ws,
        "--technician", "tech-1",
    )  # fmt: skip
    after = credentials(root)
    assert {user: after[user] for user in before} == before
    assert after["tech-1"][0] == "technician"
    assert after["tech-1"][1] not in {password for _, password in before.values()}
    assert (root / CONF / "tls" / "ca.crt").read_bytes() == ca
    assert (root / BROKER / "certs" / "server.crt").read_bytes() == server
    assert not stale.exists()
    assert "1 new, 11 kept" in output


def test_uninstall_keeps_data_unless_purged(staged, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(staged.root, root, symlinks=True)
    database = root / "var/lib/facility-gateway/gateway.db"
    database.parent.mkdir(parents=True)
    database.write_bytes(b"alerts")

    run(UNINSTALL, "--root", root)
    assert not (root / APP).exists()
    assert not (root / BROKER).exists()
    assert not (root / "etc/systemd/system/facility-gateway.service").exists()
    assert not (root / "etc/systemd/system/mosquitto.service.d").exists()
    assert credentials(root) == credentials(staged.root)
    assert (root / CONF / "site.yaml").exists()
    assert database.read_bytes() == b"alerts"

    run(UNINSTALL, "--root", root, "--purge")
    assert not (root / CONF).exists()
    assert not database.parent.exists()
    assert [path for path in root.rglob("*") if not path.is_dir()] == []
