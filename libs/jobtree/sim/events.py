"""The domain events of a scenario, as the live system would publish them (issue 10).

Contract: `scenario_events(scenario)` plays the scenario on the core and derives the events
(`jobtree.api.events.Deriver`) after each step that committed something, taking that step's
journal entries as one ledger message (sequence 1, 2, ...). Live, a ledger message is one
decision, so the grouping (and the sequences in event ids) may differ; the kinds, subjects and
words are the same. Used by `kubectl runs --local events` and the tests.
"""

from __future__ import annotations

from jobtree.api.events import Deriver
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.sim import scenario as S
from jobtree.sim.runner import played


def scenario_events(scenario: S.Scenario) -> list[bus.Event]:
    deriver = Deriver(scenario.config.cluster)
    out: list[bus.Event] = []
    for sequence, (cl, entries) in enumerate(played(scenario), 1):
        out += deriver.derive(cl, sequence, entries)
    return out
