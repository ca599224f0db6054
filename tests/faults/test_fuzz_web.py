"""Hypothesis against the web page's JSON API, over HTTP, signed in.

A real gateway serves the page; a technician and a pager (with their
sessions and CSRF tokens) send random JSON bodies to every route that
changes something, with path parameters drawn from real and unknown ids.
The property: never a server error (5xx), and every refusal (4xx) says why
in a non-empty ``detail``. Sign-in, sign-out and set-up are left out
(hundreds of wrong passwords would throttle the test's own address), and
so is a new PIN for the pager's own person; a session that ends anyway is
followed by a new sign-in, counted.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.faults.conftest import SEED, sized
from tests.test_web_access import CHANGES, _routes
from tests.web_helpers import PIN, Web, web_site

pytestmark = pytest.mark.timeout(sized(120, 1800))

CASES = sized(150, 5_000)
"""Over HTTP at a few milliseconds a request: the large size is 5,000."""

NAMES = ["ana", "ben", "ghost", "display-1", "0123456789abcdef", "", "x" * 300]
KEYS = ["name", "password", "role", "pin", "staff", "until", "reason", "device"]
KEYS += ["zone", "alert", "label", "answer", "minutes", "text", "code", "x"]
VALUES = st.recursive(
    st.one_of(
        st.sampled_from(NAMES + ["technician", "supervisor", "nurse", PIN]),
        st.none(),
        st.booleans(),
        st.integers(-(2**65), 2**65),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
    ),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=5,
)
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6),
    VALUES,
)


def test_fuzz_every_changing_route_with_random_bodies(
    start_gateway, topics, tmp_path, figures
):
    gateway = start_gateway(site=web_site(topics))
    routes = [
        (method, path)
        for method, path in _routes(tmp_path)
        if method in CHANGES
        and path.startswith("/api/")
        # Sign-in and out are left out: wrong passwords by the hundred would
        # throttle this very address (the throttle is tested in test_web.py).
        and not any(word in path for word in ("signin", "signout", "setup"))
    ]
    console, phone = Web(gateway), Web(gateway)
    assert console.sign_in().status_code == 200
    console.ok("PUT", "/api/staff/ana/pin", {"pin": PIN})
    assert phone.pager_sign_in("ana").status_code == 200
    statuses: Counter[int] = Counter()
    signed_in_again = Counter[str]()

    @seed(SEED)
    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        route=st.sampled_from(routes),
        key=st.sampled_from(NAMES),
        body=BODIES,
    )
    def send(route: tuple[str, str], key: str, body: Any) -> None:
        method, path = route
        client = phone if path.startswith("/api/pager/") else console
        if key == "ana" and path.startswith("/api/staff/"):
            key = "ben"  # a new PIN for ana would end the pager's own session
        url = re.sub(r"\{[^}]+\}", key or "x", path)
        response = client.send(method, url, body)
        statuses[response.status_code] += 1
        assert response.status_code < 500, (method, url, body, response.text)
        if response.status_code == 401:
            again = phone.pager_sign_in("ana") if client is phone else client.sign_in()
            assert again.status_code == 200, again.text
            signed_in_again[path] += 1
        elif response.status_code >= 400:
            detail = response.json().get("detail")
            assert detail, (method, url, body, response.text)
            assert json.dumps(detail) != "{}", response.text

    try:
        send()
    finally:
        console.close()
        phone.close()
        figures.update(
            input="web API",
            seed=SEED,
            routes=len(routes),
            cases=sum(statuses.values()),
            statuses={str(k): v for k, v in sorted(statuses.items())},
            signed_in_again=sum(signed_in_again.values()),
            crashes=sum(v for k, v in statuses.items() if k >= 500),
        )
    assert gateway.running
