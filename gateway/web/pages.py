"""The HTML pages: static files from ``gateway/static``, no template engine.

Each page fetches its data from the JSON API, so what the browser tests see
is what the API serves.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import HTMLResponse

if TYPE_CHECKING:
    from gateway.service import Gateway

STATIC = Path(__file__).resolve().parent.parent / "static"

HEADERS = {
    # Everything is served from here; nothing from the internet (none on site).
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self'; script-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@cache
def _text(name: str) -> str:
    return (STATIC / name).read_text()


def page(name: str) -> HTMLResponse:
    return HTMLResponse(_text(name), headers=HEADERS)


def gateway_of(request: Request) -> Gateway:
    """The gateway whose pages these are (set by ``create_app``)."""
    return request.app.state.gateway
