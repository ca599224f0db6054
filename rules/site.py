"""The physical site as the engine sees it: zones, rooms, devices and staff."""

from __future__ import annotations

from pydantic import Field, model_validator

from rules.schema import StrictModel, TimeWindow

Loc = tuple[str | int, ...]
"""Where a value sits in the site file, e.g. ``("devices", 3, "room")``."""

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""Ids become MQTT topic levels, so no ``/``, ``+``, ``#`` or spaces."""


class Room(StrictModel):
    id: str = Field(pattern=_ID)
    name: str | None = None


class Zone(StrictModel):
    """A part of the floor with its own team, e.g. a ward wing."""

    id: str = Field(pattern=_ID)
    name: str | None = None
    rooms: tuple[Room, ...] = ()


class Device(StrictModel):
    """A thing that sends events: a call station, a button, a sensor hub."""

    id: str = Field(pattern=_ID)
    kind: str = Field(min_length=1)
    """What it is, e.g. ``call_button``; rules match devices by kind."""

    room: str | None = None


class StaffMember(StrictModel):
    id: str = Field(pattern=_ID)
    name: str
    roles: tuple[str, ...] = Field(min_length=1)
    badge: str | None = None
    """Beacon id of the person's badge, if they carry one."""

    zones: tuple[str, ...] = ()
    """Zones whose team this person belongs to, for kudos; empty: every zone."""

    shifts: tuple[TimeWindow, ...] = ()
    """When this person is on duty; empty: always. Paging a role reaches the
    people of that role on duty now."""

    recognition: bool = True
    """False: the person is never named on the recognition board or a wall
    display; their closures still count, anonymously, in their team's totals."""


class Group(StrictModel):
    """Named people paged together, e.g. a rapid-response team."""

    id: str = Field(pattern=_ID)
    members: tuple[str, ...] = Field(min_length=1)


class Site(StrictModel):
    """Who and what is where; rules refer to these ids."""

    zones: tuple[Zone, ...] = ()
    devices: tuple[Device, ...] = ()
    staff: tuple[StaffMember, ...] = ()
    groups: tuple[Group, ...] = ()

    @model_validator(mode="after")
    def _references_exist(self) -> Site:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(message for _, message in problems))
        return self

    def problems(self) -> list[tuple[Loc, str]]:
        """Broken cross-references, each with where it sits in the file."""
        found: list[tuple[Loc, str]] = []
        rooms = self.room_zones()
        for index, device in enumerate(self.devices):
            if device.room is not None and device.room not in rooms:
                found.append(
                    (
                        ("devices", index, "room"),
                        f"device {device.id!r} is in room {device.room!r}, which "
                        f"no zone lists; known rooms: {', '.join(sorted(rooms))}",
                    )
                )
        rooms_in_order = [
            ((("zones", z, "rooms", r, "id")), room.id)
            for z, zone in enumerate(self.zones)
            for r, room in enumerate(zone.rooms)
        ]
        zones = {zone.id for zone in self.zones}
        for index, member in enumerate(self.staff):
            for zone in member.zones:
                if zone not in zones:
                    found.append(
                        (
                            ("staff", index, "zones"),
                            f"staff {member.id!r} is in zone {zone!r}, which is not "
                            f"under 'zones:'; known zones: {', '.join(sorted(zones))}",
                        )
                    )
        badges = [
            (("staff", index, "badge"), member.badge)
            for index, member in enumerate(self.staff)
            if member.badge is not None
        ]
        found.extend(_duplicates("badge", badges))
        staff = {member.id for member in self.staff}
        for index, group in enumerate(self.groups):
            for member in group.members:
                if member not in staff:
                    found.append(
                        (
                            ("groups", index, "members"),
                            f"group {group.id!r} lists {member!r}, who is not "
                            "under 'staff:'",
                        )
                    )
        found.extend(_duplicates("groups", _ids("groups", self.groups)))
        found.extend(_duplicates("zones", _ids("zones", self.zones)))
        found.extend(_duplicates("rooms", rooms_in_order))
        found.extend(_duplicates("devices", _ids("devices", self.devices)))
        found.extend(_duplicates("staff", _ids("staff", self.staff)))
        return found

    def room_zones(self) -> dict[str, str]:
        return {room.id: zone.id for zone in self.zones for room in zone.rooms}


def _duplicates(section: str, ids: list[tuple[Loc, str]]) -> list[tuple[Loc, str]]:
    seen: set[str] = set()
    found = []
    for loc, item in ids:
        if item in seen:
            found.append((loc, f"{section} id {item!r} is used twice"))
        seen.add(item)
    return found


def _ids(
    section: str,
    items: tuple[Zone, ...]
    | tuple[Device, ...]
    | tuple[StaffMember, ...]
    | tuple[Group, ...],
) -> list[tuple[Loc, str]]:
    return [((section, index, "id"), item.id) for index, item in enumerate(items)]
