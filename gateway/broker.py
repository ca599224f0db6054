"""Finding a broker, or starting a private Mosquitto on a free loopback port.

The demo uses this when no broker answers at the configured address, and the
tests use it to get a broker they can kill and restart at will. A private
broker refuses anonymous clients like the one we ship: it gets a fresh
password file with a random password per user.
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
    """A ``mosquitto`` process of our own, with users and passwords we chose."""

    def __init__(
        self, folder: Path, users: tuple[str, ...] = ("gateway",), port: int = 0
    ) -> None:
        self.folder = Path(folder)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.passwords = {user: secrets.token_urlsafe(18) for user in users}
        self.log_file = self.folder / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._config = self._write_config()

    def _write_config(self) -> Path:
        binary = shutil.which("mosquitto_passwd")
        if shutil.which("mosquitto") is None or binary is None:
            raise BrokerError(INSTALL_HINT)
        self.folder.mkdir(parents=True, exist_ok=True)
        password_file = self.folder / "passwd"
        password_file.write_text("")
        for user, password in self.passwords.items():
            subprocess.run(
                [binary, "-b", str(password_file), user, password],
                check=True,
                capture_output=True,
            )
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
            if port_answers(self.host, self.port, timeout=0.2):
                log.info("Started private Mosquitto on %s:%d", self.host, self.port)
                return
            time.sleep(0.05)
        self.kill()
        raise BrokerError(f"mosquitto did not listen on port {self.port} in {timeout}s")

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
