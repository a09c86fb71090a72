"""The federation's book of one cap (`services/federation/book.py`): GPU and GPU-hour ledgers
in lockstep, lowers before raises, partial raises within the room, and storage that keeps
every grant in flight."""

from __future__ import annotations

from jobtree.services.federation.book import Book, Grant


def booked(hours: int | None = None) -> Book:
    return Book.start("v/all", 16, hours, {"a": (8, None if hours is None else hours // 2, 0),
                                           "b": (8, None if hours is None else hours // 2, 0)})


def test_a_raise_waits_for_the_donors_lower_to_be_confirmed() -> None:
    book = booked()
    sent = book.plan({"a": (16, None), "b": (0, None)})
    assert sent == [Grant("v/all", "b", 1, 0, None)], "only the lower goes out: b may still use its 8"
    assert book.plan({"a": (16, None), "b": (0, None)}) == [], "nothing new while b has not confirmed"
    book.confirm("b", 1, 0, None)
    assert book.plan({"a": (16, None), "b": (0, None)}) == [Grant("v/all", "a", 1, 16, None)]
    assert book.gpus.total_held() == 16


def test_a_partial_raise_takes_what_the_cap_has_room_for() -> None:
    book = Book.start("v/all", 16, None, {"a": (4, None, 0), "b": (8, None, 0)})
    assert book.plan({"a": (12, None), "b": (4, None)}) == [Grant("v/all", "b", 1, 4, None),
                                                             Grant("v/all", "a", 1, 8, None)]
    assert book.gpus.total_held() == 16, "a got the 4 nobody held; b's 4 wait for its confirmation"


def test_gpu_hours_move_with_the_gpus_under_one_version() -> None:
    book = booked(hours=10_000)
    sent = book.plan({"a": (12, 8_000), "b": (4, 2_000)})
    assert sent == [Grant("v/all", "b", 1, 4, 2_000)], "a raise of either bound waits"
    book.confirm("b", 1, 4, 2_000)
    assert book.plan({"a": (12, 8_000), "b": (4, 2_000)}) == [Grant("v/all", "a", 1, 12, 8_000)]
    assert book.hours is not None and book.hours.total_held() == 10_000


def test_storage_keeps_grants_in_flight_and_resends_them() -> None:
    book = booked(hours=1_000)
    book.plan({"a": (16, 1_000), "b": (0, 0)})
    again = Book.from_json(book.to_json())
    assert again.to_json() == book.to_json()
    assert again.resend() == [Grant("v/all", "b", 1, 0, 0)]
    assert again.gpus.held("b") == 8, "a restarted federation still counts b at its old allowance"


def test_a_lowered_cap_is_in_force_once_the_held_allowances_fit() -> None:
    book = booked()
    book.set_cap(12, None)
    assert (book.gpus.cap, book.gpus.cap_goal) == (16, 12)
    sent = book.plan({"a": (6, None), "b": (6, None)})
    assert sent == [Grant("v/all", "a", 1, 6, None), Grant("v/all", "b", 1, 6, None)]
    book.confirm("a", 1, 6, None)
    assert book.gpus.cap == 16, "b may still use 8"
    book.confirm("b", 1, 6, None)
    assert (book.gpus.cap, book.gpus.cap_goal) == (12, None)


def test_stale_and_repeated_confirmations_change_nothing() -> None:
    book = booked()
    book.plan({"a": (4, None), "b": (8, None)})
    book.confirm("a", 1, 4, None)
    book.confirm("a", 0, 8, None)
    book.confirm("nosuch", 5, 99, None)
    book.confirm("b", 7, 0, None)
    assert book.gpus.clusters == {"a": 4, "b": 8}, "a version never granted confirms nothing"
