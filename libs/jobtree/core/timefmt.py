"""Instants and durations as whole seconds, with RFC3339 and Go-style duration text.

Contract: instants are int seconds since the Unix epoch (UTC); durations are int seconds.
Parsing is strict and raises ValidationError; formatting is `YYYY-MM-DDTHH:MM:SSZ`.
Implemented with proleptic-Gregorian arithmetic so the core needs no `datetime` (and so can be
forbidden any clock). Not: a clock — callers pass `now` in.
"""

from __future__ import annotations

import re

from jobtree.core.errors import ValidationError

HOUR = 3600
MINUTE = 60
DAY = 86400

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(Z|z|[+-]\d{2}:\d{2})$"
)


def days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic-Gregorian date (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(z: int) -> tuple[int, int, int]:
    """(year, month, day) of a day count since 1970-01-01."""
    z += 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return (y + (m <= 2), m, d)


def _days_in_month(y: int, m: int) -> int:
    if m == 2:
        return 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    return 30 if m in (4, 6, 9, 11) else 31


def parse_time(text: object, path: str = "") -> int:
    """An RFC3339 instant as Unix seconds (fractions of a second are truncated)."""
    if not isinstance(text, str):
        raise ValidationError(path, f"must be an RFC3339 time such as 2026-01-05T00:00:00Z, got {text!r}")
    m = _RFC3339.match(text.strip())
    if not m:
        raise ValidationError(path, f"must be an RFC3339 time such as 2026-01-05T00:00:00Z, got {text!r}")
    y, mo, d, hh, mi, ss = (int(m.group(i)) for i in range(1, 7))
    if not (1 <= mo <= 12 and 1 <= d <= _days_in_month(y, mo) and hh < 24 and mi < 60 and ss < 60):
        raise ValidationError(path, f"is not a valid calendar time: {text!r}")
    tz = m.group(8)
    offset = 0
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        offset = sign * (int(tz[1:3]) * HOUR + int(tz[4:6]) * MINUTE)
    return days_from_civil(y, mo, d) * DAY + hh * HOUR + mi * MINUTE + ss - offset


def format_time(t: int) -> str:
    """Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`."""
    days, rem = divmod(t, DAY)
    y, m, d = civil_from_days(days)
    return f"{y:04d}-{m:02d}-{d:02d}T{rem // HOUR:02d}:{rem % HOUR // MINUTE:02d}:{rem % MINUTE:02d}Z"


def parse_duration(text: object, path: str = "") -> int:
    """A Go-style duration (`90m`, `1h30m`, `45s`, `0s`) or a whole number of seconds, as int seconds.

    Negative durations and fractions of a second are rejected.
    """
    if isinstance(text, bool):
        raise ValidationError(path, f"must be a duration such as 15m or 1h30m, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValidationError(path, f"must not be negative, got {text}")
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValidationError(path, f"must be a duration such as 15m or 1h30m, got {text!r}")
    s = text.strip()
    if s == "0":
        return 0
    pos = 0
    total = 0.0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValidationError(path, f"must be a duration such as 15m or 1h30m (units h, m, s), got {text!r}")
    if abs(total - round(total)) > 1e-9:
        raise ValidationError(path, f"must be whole seconds, got {text!r}")
    return round(total)


def format_duration(seconds: int) -> str:
    """Seconds as a compact Go-style duration: 5400 -> `1h30m`, 0 -> `0s`."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    h, rem = divmod(s, HOUR)
    m, sec = divmod(rem, MINUTE)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{sec}s" if sec else "")
    return sign + out
