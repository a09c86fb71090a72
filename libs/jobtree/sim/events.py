"""The domain events of a scenario, as the live system would publish them (issue 10).

Contract: `scenario_events(scenario)` plays the scenario on the core and derives the events
(`jobtree.api.events.Deriver`) after each step that committed something, taking that step's
journal entries as one ledger message (sequence 1, 2, ...). Live, a ledger message is one
decision, so the grouping (and the sequences in event ids) may differ; the kinds, subjects and
words are the same. Used by `kubectl runs --local events` and the tests.
"""

from __future__ import annotations

import contextlib

from jobtree.api.events import Deriver
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.core.engine import Cluster
from jobtree.core.errors import ValidationError
from jobtree.sim import scenario as S
from jobtree.sim.runner import commands_of


def scenario_events(scenario: S.Scenario) -> list[bus.Event]:
    cl = Cluster(scenario.config, scenario.nodes, scenario.start)
    deriver = Deriver(scenario.config.cluster)
    out: list[bus.Event] = []
    mark = sequence = 0
    for step in scenario.steps:
        cl.advance(step.at)
        cmds = commands_of(step.action)
        if cmds:
            with contextlib.suppress(ValidationError):  # a refused step commits nothing
                cl.submit(*cmds)
        if len(cl.journal) > mark:
            sequence += 1
            out += deriver.derive(cl, sequence, cl.journal[mark:])
            mark = len(cl.journal)
    return out
