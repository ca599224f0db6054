"""Write the recorded sighting traces that tests/test_presence.py replays.

A trace is JSON: the receivers (device -> place) and known badges of the
site, the one ``badge`` it follows, and its sightings as rows of
``[seconds, receiver, rssi]`` in time order.

Run ``python tests/data/make_traces.py`` to rewrite them; the same seeds give
the same files byte for byte, and a test checks that they still do.

Each scenario gives, per receiver, the mean signal of one badge as keyframes
``(seconds, dBm)``, straight lines between them, ``None`` for out of range.
The badge advertises once a second with a little jitter; each receiver hears
9 adverts in 10, with Gaussian noise of ``sigma`` dB, rounded to whole dBm as
receivers report it, and a few tens of milliseconds of delivery delay.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

RECEIVERS = {
    "rx-corridor-3": "corridor-3",
    "rx-301": "room-301",
    "rx-302": "room-302",
    "rx-412": "room-412",
}
"""Receiver device -> place: a corridor, two neighbouring rooms, one far away."""

ANA = "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:3:301"
BEN = "eddystone:edd1ebeac04e5defa017:0000000000b1"

HEARD = 0.9
"""Share of adverts a receiver catches; the rest collide or fade."""

Keyframes = list[tuple[float, float | None]]

SCENARIOS: dict[str, dict[str, Any]] = {
    "nurse-visit-301": {
        "description": (
            "Ana walks up the corridor, passes room 302's open door, goes into "
            "room 301 at 20 s, stays two minutes, walks back out at 140 s and "
            "away down the corridor, out of range after 165 s."
        ),
        "badge": ANA,
        "seed": 301,
        "duration": 240,
        "sigma": 3.0,
        "means": {
            "rx-corridor-3": [
                (0, -64),
                (20, -64),
                (24, -80),
                (140, -80),
                (144, -63),
                (150, -66),
                (165, -88),
                (166, None),
            ],
            "rx-301": [
                (0, -86),
                (20, -84),
                (24, -59),
                (140, -59),
                (144, -80),
                (150, -88),
                (151, None),
            ],
            "rx-302": [
                (0, -80),
                (10, -80),
                (11, -56),
                (13, -56),
                (14, -80),
                (20, -88),
                (140, -88),
                (150, None),
            ],
        },
    },
    "doorway-301-302": {
        "description": (
            "Ana stands in the doorway between rooms 301 and 302 for ten "
            "minutes; both hear her about equally, with 4 dB of noise."
        ),
        "badge": ANA,
        "seed": 302,
        "duration": 600,
        "sigma": 4.0,
        "means": {
            "rx-301": [(0, -70)],
            "rx-302": [(0, -72)],
            "rx-corridor-3": [(0, -84)],
        },
    },
    "out-of-range": {
        "description": (
            "Ben's Eddystone badge sits in room 302 for a minute, then is "
            "heard no more (a flat battery, or a pocket in another wing)."
        ),
        "badge": BEN,
        "seed": 60,
        "duration": 120,
        "sigma": 3.0,
        "means": {
            "rx-302": [(0, -62), (60, -62), (60.5, None)],
            "rx-301": [(0, -85), (60, -85), (60.5, None)],
        },
    },
    "cloned-badge": {
        "description": (
            "Ana's badge is in room 301 throughout; from 60 s to 90 s a clone "
            "of it is held next to the receiver of room 412, a floor away."
        ),
        "badge": ANA,
        "seed": 412,
        "duration": 150,
        "sigma": 2.0,
        "means": {
            "rx-301": [(0, -56)],
            "rx-412": [(0, None), (60, -55), (90, -55), (90.5, None)],
        },
    },
}


def mean_at(keyframes: Keyframes, t: float) -> float | None:
    """Straight lines between keyframes; None (out of range) holds until the next."""
    for (t0, v0), (t1, v1) in itertools.pairwise(keyframes):
        if t0 <= t < t1:
            if v0 is None or v1 is None:
                return v0
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return keyframes[-1][1] if t >= keyframes[-1][0] else keyframes[0][1]


def sightings(scenario: dict[str, Any]) -> list[list[Any]]:
    rng = random.Random(scenario["seed"])
    rows = []
    for second in range(scenario["duration"]):
        advert = second + rng.uniform(0.0, 0.5)
        for receiver in sorted(scenario["means"]):
            mean = mean_at(scenario["means"][receiver], advert)
            heard = rng.random() < HEARD
            noise = rng.gauss(0.0, scenario["sigma"])
            delay = rng.uniform(0.01, 0.08)
            if mean is None or not heard:
                continue
            rssi = round(mean + noise)
            if rssi >= -100:
                at = round(advert + delay, 2)
                rows.append([at, receiver, rssi])
    return sorted(rows, key=lambda row: (row[0], row[1]))


def trace(name: str) -> dict[str, Any]:
    scenario = SCENARIOS[name]
    return {
        "name": name,
        "description": scenario["description"],
        "seed": scenario["seed"],
        "duration": scenario["duration"],
        "receivers": RECEIVERS,
        "badges": [ANA, BEN],
        "badge": scenario["badge"],
        "sightings": sightings(scenario),
    }


def dumps(data: dict[str, Any]) -> str:
    """JSON with one sighting a line, so a diff shows which ones changed."""
    head = {key: value for key, value in data.items() if key != "sightings"}
    lines = json.dumps(head, indent=2)[:-2] + ',\n  "sightings": [\n'
    rows = [f"    {json.dumps(row)}" for row in data["sightings"]]
    return lines + ",\n".join(rows) + "\n  ]\n}\n"


def path_of(name: str) -> Path:
    return HERE / f"presence-{name}.json"


def main() -> None:
    for name in SCENARIOS:
        path_of(name).write_text(dumps(trace(name)))


if __name__ == "__main__":
    main()
