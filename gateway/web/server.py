"""uvicorn on the gateway's own loop, stopped by the gateway, not by signals."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import uvicorn

from gateway.web.app import create_app

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

GRACE = 3
"""Seconds open requests get to finish at shutdown; live streams end at once."""


class WebServer:
    def __init__(self, gateway: Gateway, host: str, port: int) -> None:
        self.app = create_app(gateway)
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=GRACE,
        )
        self._server = uvicorn.Server(config)
        # The gateway owns SIGINT and SIGTERM; uvicorn must not take them over.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]

    @property
    def port(self) -> int | None:
        """The bound port once started (useful when configured as 0)."""
        for server in getattr(self._server, "servers", []):
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return None

    async def serve(self) -> None:
        """Serve until shut down; a failure to start costs the page, not the alerts."""
        try:
            await self._server.serve()
        except (OSError, SystemExit) as exc:
            # uvicorn exits the process when it cannot bind; paging must go on.
            log.error(
                "The web page is not served (%s); alerts and pages carry on",
                exc,
            )

    def shutdown(self) -> None:
        # Live pages would hold the server open; they reconnect after a restart.
        self.app.state.hub.shutdown()
        self._server.should_exit = True
