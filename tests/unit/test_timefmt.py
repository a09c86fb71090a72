"""timefmt: RFC3339 instants and Go-style durations as whole seconds, strict parsing."""

from __future__ import annotations

import pytest

from jobtree.core.errors import ValidationError
from jobtree.core.timefmt import (
    civil_from_days,
    days_from_civil,
    format_duration,
    format_time,
    parse_duration,
    parse_time,
)

# --- instants ------------------------------------------------------------------------------

# (text, unix seconds): independently known values.
INSTANTS = [
    ("1970-01-01T00:00:00Z", 0),
    ("2000-01-01T00:00:00Z", 946_684_800),
    ("2026-01-05T00:00:00Z", 1_767_571_200),
    ("2024-02-29T12:34:56Z", 1_709_210_096),  # leap day, leap year
    ("2000-02-29T00:00:00Z", 951_782_400),  # divisible by 400: leap
    ("2024-03-01T00:00:00Z", 1_709_251_200),  # the day after a leap day
    ("2023-12-31T23:59:59Z", 1_704_067_199),
    ("1969-12-31T23:59:59Z", -1),  # before the epoch
    ("2038-01-19T03:14:08Z", 2**31),
]


@pytest.mark.parametrize(("text", "secs"), INSTANTS)
def test_parse_and_format_round_trip(text: str, secs: int) -> None:
    assert parse_time(text) == secs
    assert format_time(secs) == text
    assert parse_time(format_time(secs)) == secs


@pytest.mark.parametrize(
    ("text", "secs"),
    [
        ("2026-01-05T02:00:00+02:00", 1_767_571_200),
        ("2026-01-04T19:00:00-05:00", 1_767_571_200),
        ("2026-01-05T05:30:00+05:30", 1_767_571_200),
        ("2026-01-05T00:00:00+00:00", 1_767_571_200),
        ("2026-01-05T00:00:00-00:00", 1_767_571_200),
        ("2024-03-01T01:00:00+02:00", 1_709_251_200 - 3600),  # offset crosses back over a leap day
        ("2026-01-05t00:00:00z", 1_767_571_200),  # lowercase t and z
        ("2026-01-05 00:00:00Z", 1_767_571_200),  # space separator
        ("2026-01-05T00:00:00.999Z", 1_767_571_200),  # fractions of a second are truncated
    ],
)
def test_parse_time_offsets_and_variants(text: str, secs: int) -> None:
    assert parse_time(text) == secs


def test_format_time_is_always_utc_z() -> None:
    assert format_time(parse_time("2026-06-30T23:30:00-01:00")) == "2026-07-01T00:30:00Z"


@pytest.mark.parametrize(
    "text",
    [
        "2023-02-29T00:00:00Z",  # not a leap year
        "1900-02-29T00:00:00Z",  # divisible by 100, not by 400
        "2100-02-29T00:00:00Z",
        "2026-04-31T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-00-10T00:00:00Z",
        "2026-01-00T00:00:00Z",
        "2026-01-05T24:00:00Z",
        "2026-01-05T23:60:00Z",
        "2026-01-05T23:59:60Z",
        "2026-01-05T00:00:00",  # no zone
        "2026-01-05",
        "2026/01/05T00:00:00Z",
        "tomorrow",
        "",
    ],
)
def test_parse_time_rejects_with_path(text: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_time(text, "spec.envelopes[0].start")
    assert err.value.path == "spec.envelopes[0].start"
    assert str(err.value).startswith("spec.envelopes[0].start: ")
    assert repr(text) in str(err.value)


@pytest.mark.parametrize("value", [None, 1_767_571_200, 1.5, ["2026-01-05T00:00:00Z"]])
def test_parse_time_rejects_non_strings(value: object) -> None:
    with pytest.raises(ValidationError, match=r"^at\.path: "):
        parse_time(value, "at.path")


@pytest.mark.parametrize("days", [-719_468, -1, 0, 59, 60, 10_957, 11_016, 19_782, 47_482, 2_932_896])
def test_civil_day_conversion_is_a_bijection(days: int) -> None:
    assert days_from_civil(*civil_from_days(days)) == days


def test_every_day_of_a_leap_cycle_round_trips() -> None:
    # 400 years hold exactly 146097 days; walk 2000-03-01 .. 2400-03-01 in 97-day strides.
    start = days_from_civil(2000, 3, 1)
    assert days_from_civil(2400, 3, 1) - start == 146_097
    for d in range(start, start + 146_097, 97):
        y, m, day = civil_from_days(d)
        assert days_from_civil(y, m, day) == d
        assert parse_time(f"{y:04d}-{m:02d}-{day:02d}T00:00:00Z") == d * 86_400


# --- durations -----------------------------------------------------------------------------

DURATIONS = [
    ("1h30m", 5400),
    ("90m", 5400),
    ("90s", 90),
    ("45s", 45),
    ("2000ms", 2),
    ("0s", 0),
    ("0", 0),
    ("0h0m0s", 0),
    ("1h", 3600),
    ("24h", 86_400),
    ("1.5h", 5400),
    ("0.5m", 30),
    ("1000000us", 1),
    ("1000000000ns", 1),
    (" 15m ", 900),
]


@pytest.mark.parametrize(("text", "secs"), DURATIONS)
def test_parse_duration(text: str, secs: int) -> None:
    assert parse_duration(text) == secs


@pytest.mark.parametrize(("value", "secs"), [(0, 0), (1, 1), (90, 90), (86_400, 86_400)])
def test_parse_duration_whole_numbers_are_seconds(value: int, secs: int) -> None:
    assert parse_duration(value) == secs


@pytest.mark.parametrize(
    ("secs", "text"),
    [(0, "0s"), (1, "1s"), (59, "59s"), (60, "1m"), (90, "1m30s"), (3600, "1h"), (3601, "1h1s"),
     (5400, "1h30m"), (86_400, "24h"), (90_061, "25h1m1s")],
)
def test_format_duration_and_round_trip(secs: int, text: str) -> None:
    assert format_duration(secs) == text
    assert parse_duration(text) == secs


@pytest.mark.parametrize(
    "value",
    [
        -1,  # negative whole number
        "-5s",  # negative text
        "-1h30m",
        "1.5s",  # fraction of a second
        "1500ms",
        "0.1s",
        "1us",
        "5",  # a bare number needs a unit
        "1d",  # days are not a unit
        "1h 30m",
        "h",
        "1hm",
        "abc",
        "",
        "   ",
        True,  # a bool is not a number of seconds
        1.5,
        None,
        [],
    ],
)
def test_parse_duration_rejects_with_path(value: object) -> None:
    with pytest.raises(ValidationError) as err:
        parse_duration(value, "spec.follow.upstreamFailureGrace")
    assert err.value.path == "spec.follow.upstreamFailureGrace"
    assert str(err.value).startswith("spec.follow.upstreamFailureGrace: ")


def test_rejection_under_a_prefix_keeps_the_path() -> None:
    with pytest.raises(ValidationError) as err:
        parse_duration("1.5s", "grace")
    assert str(err.value.under("spec.follow")).startswith("spec.follow.grace: ")
    assert "whole seconds" in str(err.value)
