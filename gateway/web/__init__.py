"""The gateway's local web page: sign-in, alerts, the floor display, the pager page.

One module per area, each with its routes: ``signin`` (first-run setup,
sign-in), ``admin`` (accounts, PINs, display tokens), ``alerts`` (floor,
console, silences), ``pager`` (the staff pager page). ``auth`` holds the
roles and CSRF checks every route goes through, ``live`` the fan-out of
committed changes to Server-Sent Events, ``accounts`` the SQLite tables.
"""

from gateway.web.app import create_app
from gateway.web.server import WebServer

__all__ = ["WebServer", "create_app"]
