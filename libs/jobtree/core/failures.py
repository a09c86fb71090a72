"""Node failures (CALCULUS §8): fencing a node, swapping spares in for lost GPUs, requeueing
or failing the runs that cannot be covered. A layer of `engine.Cluster`.
"""

from __future__ import annotations

from jobtree.core.facts import (
    LeaseMinted,
)
from jobtree.core.model import (
    Lease,
    MintReason,
    NodeState,
    Phase,
    Role,
    Slot,
)
from jobtree.core.reserving import Reserving
from jobtree.core.state import (
    R_CHECKPOINT,
    R_NODE_FAILURE,
)


class Failures(Reserving):
    def _fence(self, node: str) -> None:
        self._node_state(node, NodeState.FENCED)
        hit: dict[str, list[Lease]] = {}
        for _, holder in list(self.topo.held_slots(node)):
            lease = self.leases[holder]
            hit.setdefault(lease.run, [])
            if lease not in hit[lease.run]:
                hit[lease.run].append(lease)
        for key in sorted(hit):
            self._node_failure(key, node, hit[key])

    def _node_failure(self, key: str, node: str, lost: list[Lease]) -> None:
        lost_active: dict[int, list[Slot]] = {}
        for lease in lost:
            if lease.role is Role.ACTIVE:
                lost_active.setdefault(lease.group, []).extend(lease.slots)
            self._close(lease.name, "NodeFailure")
        broken: list[int] = []
        for g in sorted(lost_active):
            if not self._swap(key, g, len(lost_active[g]), self.topo.domain_of(node)):
                broken.append(g)
        if not broken:
            return
        spec = self.runs[key].spec
        groups = self._groups(key)
        intact = sum(self._active(ls) for g, ls in groups.items() if g not in broken)
        if spec.malleable is not None and intact >= spec.min_width:
            for g in broken:
                for lease in groups.get(g, []):
                    self._close(lease.name, "NodeFailure")
            return
        if spec.checkpoint is not None:
            self._close_run(key, "Requeued")
            self._set_status(key, phase=Phase.PENDING, reason=R_CHECKPOINT, reservation=None,
                             checkpoint_deadline=self.now + spec.checkpoint,
                             message="requeued after a node failure; fails unless running again by its checkpoint deadline")
            return
        self._close_run(key, "RunFailed")
        self._fail_reservation(key)
        self._set_status(key, phase=Phase.FAILED, reason=R_NODE_FAILURE, ended_at=self.now,
                         message=f"node {node} failed and no spare could cover the loss")

    def _swap(self, key: str, g: int, need: int, domain: str) -> bool:
        """Cover `need` lost active GPUs of group `g` with spares of the run in `domain`."""
        spares = [x for x in self.open_by_run.get(key, {}).values()
                  if x.role is Role.SPARE and self.topo.domain_of(x.node) == domain]
        spares.sort(key=lambda x: (x.group != g, x.name))
        if sum(x.gpus for x in spares) < need:
            return False
        run = self.runs[key]
        for spare in spares:
            if need == 0:
                break
            use = spare.slots[:need]
            rest = spare.slots[need:]
            need -= len(use)
            self._close(spare.name, "Swap")
            self.apply(LeaseMinted(Lease(self._next_lease_name(run), key, spare.owner, g, Role.ACTIVE, use,
                                         spare.paid_by, self.now, MintReason.SWAP)))
            if rest:
                self.apply(LeaseMinted(Lease(self._next_lease_name(run), key, spare.owner, spare.group, Role.SPARE,
                                             rest, spare.paid_by, self.now, MintReason.SWAP)))
        return True
