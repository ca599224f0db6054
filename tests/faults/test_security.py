"""Security in the battery: the existing access tests, re-run and counted.

``tests/test_broker_acl.py`` (the shipped broker configuration: anonymous,
wrong-password and other users' clients refused, every role's forbidden
publishes reaching nobody and changing nothing) and
``tests/test_web_access.py`` (every route refuses a request without a
session, every change one without the CSRF token) already run in the
default suite. The large size runs them again, in a pytest of their own,
and records their figures; nothing is copied here.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET  # noqa: N817

import pytest

from tests.faults.conftest import SIZE
from tests.helpers import ROOT
from tests.test_web_access import CHANGES, OPEN, OPEN_CHANGES, _routes

MODULES = ("tests/test_broker_acl.py", "tests/test_web_access.py")


@pytest.mark.skipif(SIZE != "large", reason="runs in the default suite already")
@pytest.mark.timeout(900)
def test_access_suites_pass_and_cover_every_route(tmp_path, figures):
    routes = _routes(tmp_path)
    changes = [(m, p) for m, p in routes if m in CHANGES and p not in OPEN_CHANGES]
    guarded = [(m, p) for m, p in routes if p not in OPEN | OPEN_CHANGES]
    figures.update(
        routes=len(routes),
        routes_behind_sign_in=len(guarded),
        changes_behind_csrf=len(changes) + len(OPEN_CHANGES),
    )

    report = tmp_path / "access.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + [f"--junitxml={report}", *MODULES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=800,
        check=False,
    )
    suite = ET.parse(report).getroot().find("testsuite")  # noqa: S314 - our own file
    assert suite is not None
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors")}
    figures.update(
        access_tests=counts["tests"],
        access_failures=counts["failures"] + counts["errors"],
        access_skipped=int(suite.get("skipped", 0)),
    )
    assert result.returncode == 0, result.stdout[-5000:]
    assert counts["tests"] > 20
