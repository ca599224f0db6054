"""A local stand-in for the organisation's recognition system, for the demo.

It receives the gateway's signed webhook batches on a loopback port, checks
each signature, drops records it has already seen (delivery is at least
once), and logs one line per credit: who closed which gap, how fast. It is
what an upstream receiver must do, kept small enough to read in a minute.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("credit")

MAX_BODY = 4 * 1024 * 1024
"""A batch of 1,000 records is well under this; more is not ours."""


class CreditBoard:
    """An HTTP receiver of credit batches on 127.0.0.1, in a thread of its own."""

    def __init__(self, secret: bytes, names: dict[str, str]) -> None:
        self._secret = secret
        self._names = names
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.credits: list[dict[str, Any]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="credit-board", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/credit"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def take(self, body: bytes, signature: str | None) -> int:
        """Check and record one batch; return the HTTP status to answer."""
        expected = "sha256=" + hmac.new(self._secret, body, hashlib.sha256).hexdigest()
        if signature is None or not hmac.compare_digest(signature, expected):
            log.warning("Refused a batch with a wrong signature")
            return 401
        try:
            records = json.loads(body)["records"]
        except (ValueError, KeyError, TypeError):
            return 400
        for record in records:
            with self._lock:
                if record["key"] in self._seen:
                    continue  # a redelivery: at least once, counted once
                self._seen.add(record["key"])
            self._show(record)
        return 200

    def _show(self, record: dict[str, Any]) -> None:
        credit = record.get("body", {}).get("credit")
        if not isinstance(credit, dict):
            return
        self.credits.append(credit)
        if credit.get("kind") == "kudos":
            team = ", ".join(self._names.get(s, s) for s in credit.get("credited", []))
            log.info(
                "KUDOS   %d happy guests in a row in %s: %s",
                credit.get("presses") or 0,
                credit.get("team"),
                team or "nobody on duty",
            )
            return
        who = credit.get("credited") or credit.get("resolved_by")
        if who is None:
            return  # cancelled at the bedside or cleared by itself: nobody's
        seconds = credit.get("response_seconds")
        fast = f"answered in {seconds:.0f} s" if seconds is not None else "closed"
        notes = []
        if credit.get("before_escalation"):
            notes.append("before escalation")
        if credit.get("outside_own_zone"):
            notes.append("outside own zone")
        if credit.get("flags"):
            notes.append("not granted: " + ", ".join(credit["flags"]))
        log.info(
            "CREDIT  %s closed %s in %s (%s), %s%s",
            self._names.get(who, who),
            credit.get("rule"),
            credit.get("room") or credit.get("zone"),
            credit.get("resolved_via"),
            fast,
            f"; {'; '.join(notes)}" if notes else "",
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        board = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self.send_error(413)
                    return
                body = self.rfile.read(length)
                status = board.take(body, self.headers.get("X-Signature"))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return  # one line per credit is enough

        return Handler
