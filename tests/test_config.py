"""Site files: check-config's verdicts, environment overrides, --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from tests.helpers import MAIN, ROOT, site_config, write_site

GOOD = """\
site:
  id: ward-9
  name: Ward 9
gateway:
  id: gw-1
mqtt:
  port: 1884
zones:
  - id: west
    rooms:
      - {id: room-1}
      - {id: room-2}
devices:
  - {id: call-1, kind: call_button, room: room-1}
  - {id: call-2, kind: call_button, room: room-2}
staff:
  - {id: ana, name: Ana, roles: [nurse]}
  - {id: chloe, name: Chloe, roles: [charge_nurse]}
rules:
  - name: patient-call
    devices: {kind: call_button}
    levels:
      - {after: 0s, roles: [nurse]}
      - {after: 90s, roles: [charge_nurse]}
"""

# (text in GOOD, replacement, field named, what the message must also say); the
# line named is the replaced one, except where ``LINE_OF`` says otherwise.
RULE = "rules[0] (patient-call)"
"""How errors name the good file's only rule: by position and by name."""

BROKEN = {
    "wrong-type": (
        "port: 1884", "port: nope", "mqtt.port", ["valid integer", "'nope'"],
    ),
    "unknown-key": (
        "{after: 90s, roles", "{aftr: 90s, roles",
        f"{RULE}.levels[1].aftr",
        ["unknown field 'aftr'", "did you mean 'after'?"],
    ),
    "unknown-section": (
        "zones:", "zone:", "zone", ["unknown field 'zone'", "did you mean 'zones'?"],
    ),
    "missing-field": (
        "{id: chloe, name: Chloe, roles", "{id: chloe, roles", "staff[1].name",
        ["required field is missing"],
    ),
    "first-level-later": (
        "{after: 0s, roles", "{after: 5s, roles", RULE,
        ["first level", "must be 0s", "got 5s"],
    ),
    "bad-duration": (
        "{after: 90s, roles", "{after: soon, roles",
        f"{RULE}.levels[1].after",
        ["duration", "'soon'"],
    ),
    "unknown-room": (
        "call-2, kind: call_button, room: room-2",
        "call-2, kind: call_button, room: room-7",
        "devices[1].room", ["'room-7'", "no zone lists", "room-1, room-2"],
    ),
    "role-nobody-has": (
        "{after: 90s, roles: [charge_nurse]}", "{after: 90s, roles: [charge_nurce]}",
        f"{RULE}.levels[1].roles",
        ["'charge_nurce'", "nobody would be paged", "charge_nurse, nurse"],
    ),
    "unknown-staff": (
        "{after: 90s, roles: [charge_nurse]}", "{after: 90s, staff: [zed]}",
        f"{RULE}.levels[1].staff", ["'zed'", "not under 'staff:'"],
    ),
    "duplicate-device": (
        "{id: call-2, kind", "{id: call-1, kind", "devices[1].id",
        ["'call-1' is used twice"],
    ),
    "duplicate-staff": (
        "{id: chloe, name", "{id: ana, name", "staff[1].id", ["'ana' is used twice"],
    ),
    "duplicate-room": (
        "{id: room-2}", "{id: room-1}", "zones[0].rooms[1].id",
        ["'room-1' is used twice"],
    ),
    "id-not-a-topic-level": (
        "id: ward-9", "id: ward/9", "site.id", ["should match pattern", "'ward/9'"],
    ),
}  # fmt: skip

LINE_OF = {"first-level-later": "- name: patient-call"}
"""A rule's own checks point at the rule, whose first line is its name."""


def check_config(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MAIN), "check-config", str(path)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def line_of(text: str, fragment: str) -> int:
    [number] = [n for n, line in enumerate(text.splitlines(), 1) if fragment in line]
    return number


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_file_is_refused_with_where_and_why(name, tmp_path):
    """check-config exits 2 naming the file, line, field and what was expected."""
    old, new, field, expected = BROKEN[name]
    line = line_of(GOOD, LINE_OF.get(name, old))
    path = tmp_path / "site.yaml"
    path.write_text(GOOD.replace(old, new, 1))

    result = check_config(path)
    assert result.returncode == 2
    assert result.stdout == ""
    messages = result.stderr.splitlines()
    assert all(m.startswith(f"{path}:") for m in messages)
    [message] = [m for m in messages if m.startswith(f"{path}:{line}: {field}: ")]
    for words in expected:
        assert words in message


def test_invalid_yaml_names_the_line(tmp_path):
    """A YAML syntax error is refused with its line and the parser's complaint."""
    path = tmp_path / "site.yaml"
    path.write_text(GOOD.replace("name: Ward 9", "name: Ward: 9"))
    result = check_config(path)
    assert result.returncode == 2
    assert result.stderr == (
        f"{path}:{line_of(GOOD, 'name: Ward 9')}: not valid YAML: "
        "mapping values are not allowed in this context\n"  # libyaml's wording
    )


@pytest.mark.parametrize("text", ["", "- a list\n- not a mapping\n"])
def test_file_that_is_not_a_mapping_is_refused(text, tmp_path):
    """An empty file or a list is refused with what was expected."""
    path = tmp_path / "site.yaml"
    path.write_text(text)
    result = check_config(path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}:1: expected a mapping")


def test_missing_file_is_refused(tmp_path):
    """A path with no file is refused, naming it."""
    result = check_config(tmp_path / "nowhere.yaml")
    assert result.returncode == 2
    assert f"{tmp_path / 'nowhere.yaml'}: cannot read" in result.stderr


@pytest.mark.parametrize("site", ["good", "demo", "tests"])
def test_good_files_pass(site, tmp_path):
    """The example above, the demo ward and the tests' own site file pass."""
    path = {
        "good": tmp_path / "good.yaml",
        "demo": ROOT / "sites" / "demo-ward.yaml",
        "tests": tmp_path / "tests.yaml",
    }[site]
    (tmp_path / "good.yaml").write_text(GOOD)
    write_site(tmp_path / "tests.yaml", site_config("t-1", devices=2))
    result = check_config(path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(f"{path}: OK")


def test_environment_overrides_the_file(tmp_path):
    """GATEWAY_MQTT__PORT and GATEWAY_WEB__PORT replace the file's values."""
    path = tmp_path / "site.yaml"
    path.write_text(GOOD)
    assert (load_config(path, {}).mqtt.port, load_config(path, {}).web.port) == (
        1884,
        8080,
    )
    config = load_config(
        path,
        {"GATEWAY_MQTT__PORT": "1999", "GATEWAY_WEB__PORT": "0", "HOME": "/x"},
    )
    assert (config.mqtt.port, config.web.port) == (1999, 0)
    assert config.site.id == "ward-9"


def test_environment_fills_a_section_the_file_lacks(tmp_path):
    """An override works even when the file has no such section."""
    path = tmp_path / "site.yaml"
    path.write_text(GOOD)
    config = load_config(path, {"GATEWAY_DATABASE__PATH": str(tmp_path / "x.db")})
    assert config.database.path == tmp_path / "x.db"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("GATEWAY_MQTT__PORT", "abc", "mqtt.port: Input should be a valid integer"),
        ("GATEWAY_WEB__PORT", "70000", "web.port: Input should be less than or equal"),
        ("GATEWAY_MQTT__PROT", "1884", "did you mean 'port'?"),
    ],
)
def test_bad_environment_value_names_the_variable(variable, value, expected, tmp_path):
    """A bad override is refused naming the variable, not a line of the file."""
    path = tmp_path / "site.yaml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError) as error:
        load_config(path, {variable: value})
    [message] = error.value.problems
    assert message.startswith(f"{path} (environment variable {variable}): ")
    assert expected in message


def test_check_config_reads_the_environment(tmp_path):
    """The command line applies overrides too, and refuses a bad one with 2."""
    path = tmp_path / "site.yaml"
    path.write_text(GOOD)
    result = check_config(path, GATEWAY_WEB__PORT="http")
    assert result.returncode == 2
    assert "(environment variable GATEWAY_WEB__PORT): web.port" in result.stderr


def test_run_refuses_a_broken_file_before_connecting(tmp_path):
    """`run` on a broken file exits 2 with the same message, nothing started."""
    path = tmp_path / "site.yaml"
    path.write_text(GOOD.replace("port: 1884", "port: nope"))
    result = subprocess.run(
        [sys.executable, str(MAIN), "run", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{path}:7: mqtt.port:" in result.stderr
    assert "Connecting" not in result.stderr


@pytest.mark.parametrize(
    ("command", "mentions"),
    [
        ([], ["run", "demo", "check-config"]),
        (["run"], ["--config"]),
        (["demo"], ["--site", "--duration"]),
        (["check-config"], ["file"]),
    ],
)
def test_help_works_for_each_command(command, mentions):
    """--help exits 0 and describes the command's arguments."""
    result = subprocess.run(
        [sys.executable, str(MAIN), *command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: main.py")
    for word in mentions:
        assert word in result.stdout


def test_committed_schema_matches_the_models():
    """sites/site.schema.json is what `main.py schema` prints today."""
    from gateway.config import site_json_schema

    committed = json.loads((ROOT / "sites" / "site.schema.json").read_text())
    assert committed == site_json_schema(), (
        "regenerate with: python main.py schema > sites/site.schema.json"
    )
