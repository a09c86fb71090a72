"""`RestartPolicy`: when `jobtree up` restarts a process that died (issue 13, item 1)."""

from __future__ import annotations

from jobtree.bus.supervisor import RestartPolicy


def test_backoff_doubles_with_each_recent_restart_up_to_the_longest() -> None:
    policy = RestartPolicy(first=0.25, longest=1.0, window=60.0, limit=10)
    delays = []
    t = 0.0
    for _ in range(5):
        delay = policy.delay("gateway", t)
        assert delay is not None
        delays.append(delay)
        policy.restarted("gateway", t + delay)
        t += delay + 0.1
    assert delays == [0.25, 0.5, 1.0, 1.0, 1.0]


def test_restarts_outside_the_window_are_forgotten() -> None:
    policy = RestartPolicy(first=0.25, window=60.0, limit=3)
    for t in (0.0, 1.0, 2.0):
        policy.restarted("binder", t)
    assert policy.delay("binder", 3.0) is None  # three restarts within 60 s: a crash loop
    assert policy.delay("binder", 61.5) == 0.5  # the first two have left the window
    assert policy.delay("binder", 62.5) == 0.25
    assert policy.delay("packer", 3.0) == 0.25  # per process


def test_a_crash_loop_is_given_up_at_the_limit() -> None:
    policy = RestartPolicy(first=0.1, window=60.0, limit=5)
    t = 0.0
    given = 0
    while (delay := policy.delay("admission", t)) is not None:
        given += 1
        policy.restarted("admission", t + delay)
        t += delay + 0.5
    assert given == 5
