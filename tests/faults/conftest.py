"""The fault battery: sizes, the `faults` marker, and the figures each test reports.

``FAULTS_SIZE=small`` (the default, part of the suite) or ``large`` (on demand).
Every test reports its figures through the ``figures`` fixture; at the end of
the session they are written, one JSON line per test, to
``bench/results/faults-<size>.json`` for the large size or with
``FAULTS_RECORD=1``, and otherwise to the temporary folder (its path is
printed in the terminal summary).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT

SIZES = ("small", "large")

SIZE = os.environ.get("FAULTS_SIZE", "small")
if SIZE not in SIZES:
    raise pytest.UsageError(f"FAULTS_SIZE={SIZE!r}: expected one of {SIZES}")

SEED = int(os.environ.get("FAULTS_SEED") or random.randrange(1_000_000))
"""One seed for the run's random choices; ``FAULTS_SEED=N`` replays a run."""

HERE = Path(__file__).resolve().parent

_FIGURES: list[dict[str, Any]] = []
_OUTCOME = pytest.StashKey[str]()


def sized(small: Any, large: Any) -> Any:
    """The value for the size this run was asked for."""
    return large if SIZE == "large" else small


def results_path() -> Path:
    if SIZE == "large" or os.environ.get("FAULTS_RECORD") == "1":
        return ROOT / "bench" / "results" / f"faults-{SIZE}.json"
    return Path(tempfile.gettempdir()) / f"faults-{SIZE}-{os.getpid()}.json"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.resolve().parent == HERE:
            item.add_marker(pytest.mark.faults)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    report = yield
    if report.when == "call" or report.failed:
        item.stash[_OUTCOME] = report.outcome
    return report


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A dict the test fills with its figures; recorded with the test's outcome.

    Fill it as the test goes, so a failing test still reports what it saw.
    """
    found: dict[str, Any] = {}
    started = time.monotonic()
    yield found
    _FIGURES.append(
        {
            "test": request.node.name,
            "size": SIZE,
            "result": request.node.stash.get(_OUTCOME, "error"),
            "seconds": round(time.monotonic() - started, 1),
            "date": time.strftime("%Y-%m-%d"),
            **found,
        }
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _FIGURES:
        return
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A run of some of the tests replaces their lines and keeps the others'.
    ran = {figure["test"] for figure in _FIGURES}
    kept = []
    if path.exists():
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["test"] not in ran
        ]
    lines = kept + [json.dumps(figure, sort_keys=True) for figure in _FIGURES]
    path.write_text("\n".join(lines) + "\n")


def pytest_report_header() -> str:
    return f"fault battery: FAULTS_SIZE={SIZE} FAULTS_SEED={SEED}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.write_line(f"fault battery figures: {results_path()}")
        for figure in _FIGURES:
            terminalreporter.write_line("  " + json.dumps(figure, sort_keys=True))
