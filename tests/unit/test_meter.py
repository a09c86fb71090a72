"""meter: funded GPU-seconds per bound clamped at B, unfunded GPU-seconds per owner (§2 Metering)."""

from __future__ import annotations

import pytest

from jobtree.core.meter import Meter, cap_seconds

ENV = ("env", "b", "e")
LEND = ("lend", "b", "e")
CAP = ("cap", "b", "c")
BORROW = ("borrow", "default/r")
FREE = ("env", "b", "unbounded")


@pytest.mark.parametrize(("hours", "secs"), [(0, 0), (1, 3600), (0.5, 1800), (2.25, 8100), (1 / 3, 1200),
                                             (0.1, 360), (1000, 3_600_000)])
def test_cap_seconds(hours: float, secs: int) -> None:
    assert cap_seconds(hours) == secs


@pytest.mark.parametrize(
    ("charges", "consumed"),
    [
        ([(100, 2)], 200),
        ([(100, 2), (50, 4)], 400),
        ([(1000, 2), (1000, 2)], 3600),  # 4000 clamps at the 1h cap
        ([(3600, 1)], 3600),  # exactly at the cap
        ([(3601, 1)], 3600),
        ([(0, 8), (-5, 8)], 0),  # no time, no charge
        ([(100, 0)], 0),
    ],
)
def test_charge_clamps_at_the_cap(charges: list[tuple[int, int]], consumed: int) -> None:
    m = Meter()
    caps = {ENV: 1.0}
    for dt, width in charges:
        m.charge(dt, {ENV: width}, caps, [])
    assert m.consumed.get(ENV, 0) == consumed
    assert m.hours(ENV) == consumed / 3600
    assert m.remaining(ENV, caps) == 3600 - consumed
    assert (ENV in m.spent(caps)) is (consumed >= 3600)


def test_uncapped_bounds_accumulate_and_borrow_bounds_are_not_charged() -> None:
    m = Meter()
    caps = {ENV: 1.0, LEND: 0.5, CAP: 10.0}
    m.charge(3000, {ENV: 1, LEND: 1, CAP: 1, BORROW: 1, FREE: 3}, caps, [])
    assert m.consumed == {ENV: 3000, LEND: 1800, CAP: 3000, FREE: 9000}
    assert m.spent(caps) == frozenset({LEND})
    assert m.remaining(FREE, caps) is None
    assert m.remaining(LEND, caps) == 0


def test_unfunded_accrues_per_owner_and_charges_no_bound() -> None:
    m = Meter()
    m.charge(600, {}, {}, [("org:a", 4), ("org:b", 0), ("org:c", 1)])
    m.charge(60, {}, {}, [("org:a", 2)])
    assert m.unfunded == {"org:a": 2520, "org:c": 600}
    assert m.consumed == {}


@pytest.mark.parametrize(
    ("consumed", "widths", "caps", "expected"),
    [
        (0, {ENV: 7}, {ENV: 1.0}, 515),  # 3600 / 7 = 514.3: rounds up to the whole second
        (0, {ENV: 8}, {ENV: 1.0}, 450),  # exact
        (3599, {ENV: 5}, {ENV: 1.0}, 1),  # one GPU-second left
        (3600, {ENV: 5}, {ENV: 1.0}, None),  # already spent: no future instant
        (0, {ENV: 0}, {ENV: 1.0}, None),  # nothing funded: never runs dry
        (0, {FREE: 5}, {}, None),  # no cap
        (0, {ENV: 1, CAP: 2}, {ENV: 1.0, CAP: 1.0}, 1800),  # the earliest bound wins
    ],
)
def test_next_exhaustion(consumed: int, widths: dict, caps: dict, expected: int | None) -> None:
    m = Meter()
    if consumed:
        m.consumed[ENV] = consumed
    now = 1_767_571_200
    got = m.next_exhaustion(now, widths, caps)
    assert got == (None if expected is None else now + expected)


def test_exhaustion_timer_fires_on_the_second_the_cap_is_reached() -> None:
    m = Meter()
    caps = {ENV: 1.0}
    now = 0
    t = m.next_exhaustion(now, {ENV: 7}, caps)
    assert t == 515
    m.charge(t - 1 - now, {ENV: 7}, caps, [])
    assert ENV not in m.spent(caps)
    m.charge(1, {ENV: 7}, caps, [])
    assert ENV in m.spent(caps)
    assert m.consumed[ENV] == 3600  # never above B


def test_reset_window() -> None:
    m = Meter()
    w1, w2 = (0, 3600), (3600, 7200)
    m.reset_window(ENV, w1)  # first sight: recorded, nothing to forget
    m.charge(100, {ENV: 2}, {}, [])
    m.reset_window(ENV, w1)  # same window: kept
    assert m.consumed[ENV] == 200
    m.reset_window(ENV, w2)  # a new window: counts afresh
    assert ENV not in m.consumed
    m.charge(10, {ENV: 1}, {}, [])
    m.reset_window(ENV, w2)
    assert m.consumed[ENV] == 10
    m.reset_window(ENV, (None, None))
    assert m.consumed.get(ENV, 0) == 0


def test_replaying_the_same_charges_reproduces_every_figure() -> None:
    steps = [(60, {ENV: 4, CAP: 4}, [("org:a", 2)]), (120, {ENV: 8, CAP: 10}, []),
             (3000, {ENV: 8, CAP: 10}, [("org:b", 1)])]
    caps = {ENV: 2.0, CAP: 5.0}

    def play() -> tuple[dict, dict]:
        m = Meter()
        for dt, widths, unf in steps:
            m.charge(dt, widths, caps, unf)
        return dict(m.consumed), dict(m.unfunded)

    first = play()
    assert first == play()
    assert first[0] == {ENV: 7200, CAP: 18_000}
