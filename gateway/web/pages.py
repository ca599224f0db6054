"""The HTML pages: static files from ``gateway/static``, no template engine.

Each page fetches its data from the JSON API, so what the browser tests see
is what the API serves.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi.responses import HTMLResponse

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
