"""Finding a broker, or starting a private Mosquitto on a free loopback port.

The demo uses this when no broker answers at the configured address, and the
tests use it to get a broker they can kill and restart at will. A private
broker refuses anonymous clients like the one we ship: it gets a fresh
password file with a random password per user.

It comes in two kinds. The simple one has one loopback listener and lets
every user do anything; most tests and the demo use it. The shipped one
(``PrivateBroker(folder, site=...)``) renders exactly the configuration we
install (``systemd/mosquitto/``, see :mod:`gateway.broker_config`): the
loopback listener, the TLS listener with a throwaway certificate, the
WebSockets listener, and the ACL for every role, all on free loopback ports.
"""

from __future__ import annotations

import getpass
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from gateway.broker_config import (
    BrokerFiles,
    BrokerSite,
    Listeners,
    render_acl,
    render_config,
)

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "Mosquitto is not installed. Install it with "
    "'sudo apt-get install -y mosquitto' (Debian, Raspberry Pi OS), then run "
    "the command again."
)


class BrokerError(RuntimeError):
    """A private broker could not be started."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class PrivateBroker:
    """A ``mosquitto`` process of our own, with users and passwords we chose.

    ``port`` is the loopback listener without TLS, the one the gateway uses.
    With ``site``, the broker runs the shipped configuration for that site's
    users, and ``tls_port``, ``websockets_port`` and ``ca_file`` are set.
    """

    def __init__(
        self,
        folder: Path,
        users: tuple[str, ...] = ("gateway",),
        port: int = 0,
        *,
        site: BrokerSite | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.site = site
        names = tuple(user.name for user in site.users) if site else users
        self.passwords = {user: secrets.token_urlsafe(18) for user in names}
        self.roles = {user.name: user.role for user in site.users} if site else {}
        self.log_file = self.folder / "mosquitto.log"
        self.tls_port: int | None = None
        self.websockets_port: int | None = None
        self.ca_file: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._check_installed()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_passwords(self.folder / "passwd")
        self._config = self._write_shipped(site) if site else self._write_simple()

    @staticmethod
    def _check_installed() -> None:
        if not all(shutil.which(name) for name in ("mosquitto", "mosquitto_passwd")):
            raise BrokerError(INSTALL_HINT)

    def _write_passwords(self, password_file: Path) -> None:
        """Write ``user:password`` lines, then let mosquitto_passwd hash them."""
        password_file.write_text(
            "".join(f"{user}:{password}\n" for user, password in self.passwords.items())
        )
        password_file.chmod(0o600)
        subprocess.run(
            ["mosquitto_passwd", "-U", str(password_file)],
            check=True,
            capture_output=True,
        )

    def _write_shipped(self, site: BrokerSite) -> Path:
        """Render the shipped configuration on free loopback ports."""
        cert, key = self._throwaway_certificate()
        self.ca_file = cert
        self.tls_port = free_port()
        self.websockets_port = free_port()
        listeners = Listeners(
            local_port=self.port,
            tls_port=self.tls_port,
            tls_bind=self.host,
            websockets_port=self.websockets_port,
            websockets_bind=self.host,
        )
        files = BrokerFiles(
            password_file=self.folder / "passwd",
            acl_file=self.folder / "acl",
            cert_file=cert,
            key_file=key,
            log_dest=f"file {self.log_file}",
            # Ignored unless started as root; as root, keep our own user,
            # which can read the private temporary folder.
            run_user=getpass.getuser(),
        )
        files.acl_file.write_text(render_acl(site))
        config = self.folder / "mosquitto.conf"
        config.write_text(render_config(listeners, files))
        return config

    def _throwaway_certificate(self) -> tuple[Path, Path]:
        """A self-signed certificate for 127.0.0.1 that clients trust directly."""
        if shutil.which("openssl") is None:
            raise BrokerError(
                "openssl is not installed; install it with "
                "'sudo apt-get install -y openssl' to start a TLS listener"
            )
        cert, key = self.folder / "server.crt", self.folder / "server.key"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                "-keyout", str(key), "-out", str(cert), "-days", "2",
                "-subj", "/CN=localhost",
                "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        return cert, key

    def _write_simple(self) -> Path:
        password_file = self.folder / "passwd"
        config = self.folder / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous false\n"
            f"password_file {password_file}\n"
            # Nagle off: without it a lone small publish waits ~10 ms.
            "set_tcp_nodelay true\n"
            # Our state lives in SQLite; the broker must start clean.
            "persistence false\n"
            "max_queued_messages 100000\n"
            # The gateway acknowledges a batch only after committing it; the
            # default of 20 unacknowledged messages would cap every batch.
            "max_inflight_messages 1000\n"
            f"log_dest file {self.log_file}\n"
            # Started as root, mosquitto would switch to the 'mosquitto' user,
            # which cannot read a private temporary folder; keep our own user.
            + (f"user {getpass.getuser()}\n" if os.geteuid() == 0 else "")
        )
        return config

    @property
    def ports(self) -> list[int]:
        """Every listener's port: loopback, then TLS and WebSockets if shipped."""
        extra = [self.tls_port, self.websockets_port]
        return [self.port, *(port for port in extra if port is not None)]

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto and wait until it accepts connections."""
        self._process = subprocess.Popen(
            ["mosquitto", "-c", str(self._config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with status {self._process.returncode}; "
                    f"see {self.log_file}"
                )
            if all(port_answers(self.host, port, 0.2) for port in self.ports):
                others = ", ".join(str(port) for port in self.ports[1:])
                log.info(
                    "Started private Mosquitto on %s:%d%s",
                    self.host,
                    self.port,
                    f" (and ports {others})" if others else "",
                )
                return
            time.sleep(0.05)
        self.kill()
        raise BrokerError(f"mosquitto did not listen on {self.ports} in {timeout}s")

    def kill(self) -> None:
        """Stop it the hard way, as a crash or power cut would."""
        self._stop(signal.SIGKILL)

    def stop(self) -> None:
        self._stop(signal.SIGTERM)

    def _stop(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
