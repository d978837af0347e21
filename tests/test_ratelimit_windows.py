"""Calendar quota windows (gateway.ratelimit.policies.calendar_window): days and months in UTC and in other
zones, across DST transitions, month lengths and leap years, and the exact instant a quota resets."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from gateway.auth.identity import Identity
from gateway.config import PolicyConfig
from gateway.ratelimit.memory import MemoryBackend
from gateway.ratelimit.policies import Caller, Policy, calendar_window

HOUR = 3600.0


def at(iso: str) -> float:
    """Epoch seconds of an ISO 8601 time with an explicit offset."""
    return datetime.fromisoformat(iso).timestamp()


def window(iso: str, kind: str, zone: str) -> tuple[float, float]:
    return calendar_window(at(iso), kind, ZoneInfo(zone))


# now, window, zone, expected start and end (ISO 8601 with the offset in force at that instant)
WINDOWS = """
# UTC
2026-11-22T08:41:15+00:00  day    UTC               2026-11-22T00:00:00+00:00  2026-11-23T00:00:00+00:00
2026-11-22T08:41:15+00:00  month  UTC               2026-11-01T00:00:00+00:00  2026-12-01T00:00:00+00:00
2026-12-31T23:59:59+00:00  day    UTC               2026-12-31T00:00:00+00:00  2027-01-01T00:00:00+00:00
2026-12-15T12:00:00+00:00  month  UTC               2026-12-01T00:00:00+00:00  2027-01-01T00:00:00+00:00
# month lengths and leap years
2024-02-29T12:00:00+00:00  month  UTC               2024-02-01T00:00:00+00:00  2024-03-01T00:00:00+00:00
2023-02-28T12:00:00+00:00  month  UTC               2023-02-01T00:00:00+00:00  2023-03-01T00:00:00+00:00
2100-02-15T12:00:00+00:00  month  UTC               2100-02-01T00:00:00+00:00  2100-03-01T00:00:00+00:00
2000-02-15T12:00:00+00:00  month  UTC               2000-02-01T00:00:00+00:00  2000-03-01T00:00:00+00:00
2026-04-30T23:00:00+00:00  month  UTC               2026-04-01T00:00:00+00:00  2026-05-01T00:00:00+00:00
2026-01-31T23:00:00+00:00  month  UTC               2026-01-01T00:00:00+00:00  2026-02-01T00:00:00+00:00
# another zone: the local date decides, the boundaries are local midnights
2026-11-21T20:00:00+00:00  day    Asia/Seoul        2026-11-22T00:00:00+09:00  2026-11-23T00:00:00+09:00
2026-11-30T15:00:00+00:00  month  Asia/Seoul        2026-12-01T00:00:00+09:00  2027-01-01T00:00:00+09:00
2026-11-30T14:59:59+00:00  month  Asia/Seoul        2026-11-01T00:00:00+09:00  2026-12-01T00:00:00+09:00
# spring forward (02:00 -> 03:00): a 23 h day; fall back (03:00 -> 02:00): a 25 h day
2026-03-29T12:00:00+02:00  day    Europe/Berlin     2026-03-29T00:00:00+01:00  2026-03-30T00:00:00+02:00
2026-10-25T12:00:00+01:00  day    Europe/Berlin     2026-10-25T00:00:00+02:00  2026-10-26T00:00:00+01:00
2026-03-15T12:00:00+01:00  month  Europe/Berlin     2026-03-01T00:00:00+01:00  2026-04-01T00:00:00+02:00
2026-11-01T12:00:00-05:00  day    America/New_York  2026-11-01T00:00:00-04:00  2026-11-02T00:00:00-05:00
# midnight itself skipped (Havana: 00:00 -> 01:00): the day starts at the jump
2015-03-08T12:00:00-04:00  day    America/Havana    2015-03-08T00:00:00-05:00  2015-03-09T00:00:00-04:00
2015-03-07T12:00:00-05:00  day    America/Havana    2015-03-07T00:00:00-05:00  2015-03-08T00:00:00-05:00
"""


@pytest.mark.parametrize(
    ("now", "kind", "zone", "start", "end"),
    [tuple(line.split()) for line in WINDOWS.strip().splitlines() if not line.startswith("#")],
)
def test_windows(now: str, kind: str, zone: str, start: str, end: str) -> None:
    assert window(now, kind, zone) == (at(start), at(end))


@pytest.mark.parametrize(
    ("first", "second", "kind", "zone", "start", "hours"),
    [
        # Azores 2015-10-25: 01:00 (UTC+0) goes back to 00:00 (UTC-1), so 00:00-01:00 happens twice
        ("2015-10-25T00:30:00+00:00", "2015-10-25T00:30:00-01:00", "day", "Atlantic/Azores",
         "2015-10-25T00:00:00+00:00", 25),
        # Havana 2015-11-01: 01:00 (UTC-4) goes back to 00:00 (UTC-5), on the first day of a month
        ("2015-11-01T00:30:00-04:00", "2015-11-01T00:30:00-05:00", "day", "America/Havana",
         "2015-11-01T00:00:00-04:00", 25),
        ("2015-11-01T00:30:00-04:00", "2015-11-01T00:30:00-05:00", "month", "America/Havana",
         "2015-11-01T00:00:00-04:00", 30 * 24 + 1),
    ],
)  # fmt: skip
def test_a_repeated_hour_after_midnight_stays_in_its_days_window(
    first: str, second: str, kind: str, zone: str, start: str, hours: int
) -> None:
    assert at(second) - at(first) == HOUR  # the same wall-clock time, an hour apart
    assert window(first, kind, zone) == window(second, kind, zone)
    begin, end = window(second, kind, zone)
    assert begin == at(start)
    assert end - begin == hours * HOUR


@pytest.mark.parametrize(
    ("zone", "kind", "iso"),
    [
        ("UTC", "day", "2026-11-22T08:00:00+00:00"),
        ("UTC", "month", "2024-02-10T00:00:00+00:00"),
        ("Asia/Seoul", "month", "2026-11-10T00:00:00+09:00"),
        ("Europe/Berlin", "day", "2026-10-25T12:00:00+01:00"),
        ("Atlantic/Azores", "day", "2015-10-25T00:30:00-01:00"),
        ("America/Havana", "month", "2015-11-01T00:30:00-05:00"),
        ("America/Havana", "day", "2015-03-07T12:00:00-05:00"),
    ],
)
def test_windows_tile_time_and_change_at_the_exact_boundary(zone: str, kind: str, iso: str) -> None:
    tz = ZoneInfo(zone)
    start, end = calendar_window(at(iso), kind, tz)
    assert calendar_window(start, kind, tz) == (start, end)
    assert calendar_window(end - 1e-6, kind, tz) == (start, end)
    following = calendar_window(end, kind, tz)
    assert following[0] == end  # no gap, no overlap
    assert calendar_window(start - 1e-6, kind, tz)[1] == start


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("zone", "kind", "iso"),
    [
        ("UTC", "month", "2026-11-22T08:00:00+00:00"),
        ("Asia/Seoul", "day", "2026-11-22T08:00:00+09:00"),
        ("Atlantic/Azores", "day", "2015-10-25T00:30:00+00:00"),
    ],
)
async def test_a_quota_resets_at_the_window_end_and_not_before(zone: str, kind: str, iso: str) -> None:
    """Through Policy.limit_for and the backend, on a fake clock: used up, still used up a microsecond
    before the window's end, fresh at the end."""
    config = PolicyConfig(key=("customer",), algorithm="quota", window=kind, timezone=zone, limit=2)
    policy = Policy("q", config, ZoneInfo(zone))
    clock = FakeClock(at(iso))
    backend = MemoryBackend(clock=clock)
    caller = Caller(None, Identity(credential_type="agent", customer_id="c1"), "r")

    async def check() -> tuple[bool, float]:
        limit = policy.limit_for(caller, clock.now, 1)
        assert limit is not None
        decision = (await backend.check([limit]))[0]
        return decision.allowed, limit.window_end

    assert [(await check())[0] for _ in range(3)] == [True, True, False]
    _, end = await check()
    assert end == calendar_window(at(iso), kind, ZoneInfo(zone))[1]
    clock.now = end - 1e-6
    assert (await check())[0] is False
    clock.now = end
    assert (await check())[0] is True


def test_limit_for_counts_in_calendar_windows_window_even_where_windows_overlap() -> None:
    """limit_for remembers its limits per window: it must hand out exactly calendar_window's, also where a
    zone's windows overlap. America/Goose_Bay fell back from 00:01 to 23:01 until 2011, so for an hour
    after a day began the previous day's window applied again: an instant inside the new day's window
    that still counts in the old one."""
    zone = ZoneInfo("America/Goose_Bay")
    config = PolicyConfig(key=("customer",), algorithm="quota", window="day", timezone=zone.key, limit=5)
    policy = Policy("q", config, zone)
    caller = Caller(None, Identity(credential_type="agent", customer_id="c1"), "r")
    new_day = at("1987-10-25T00:00:00-03:00")
    early, late = calendar_window(new_day, "day", zone), calendar_window(new_day + 300, "day", zone)
    assert early[0] == new_day and late[1] == new_day  # the overlap this test is about
    for now in [new_day - HOUR, new_day, new_day + 300, new_day + HOUR - 1, new_day + HOUR + 60, new_day]:
        limit = policy.limit_for(caller, now, 1)
        assert limit is not None
        assert (limit.window_start, limit.window_end) == calendar_window(now, "day", zone)
        assert limit.storage_key == f"{limit.key}:{round(limit.window_start * 1000)}"


def test_utc_offsets_in_these_tests_are_what_the_zone_database_says() -> None:
    """Guards the expectations above against a tzdata that no longer has these historical rules."""
    azores = ZoneInfo("Atlantic/Azores")
    assert datetime(2015, 10, 25, 0, 30, tzinfo=UTC).astimezone(azores).utcoffset().total_seconds() == 0
    assert datetime(2015, 10, 25, 1, 30, tzinfo=UTC).astimezone(azores).fold == 1
