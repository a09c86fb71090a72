"""Elasticity (CALCULUS §6): growing malleable runs a step at a time from headroom, and
voluntary shrinks. A layer of `engine.Cluster`.
"""

from __future__ import annotations

from dataclasses import replace

from jobtree.core.errors import Precondition, ValidationError
from jobtree.core.facts import (
    SpecPut,
)
from jobtree.core.failures import Failures
from jobtree.core.model import (
    MintReason,
)


class Elasticity(Failures):
    def _shrink(self, key: str, desired: int) -> None:
        self._live(key, "shrink.run")
        run = self.runs[key]
        m = run.spec.malleable
        st = self.status[key]
        if st.phase.terminal:
            raise Precondition("shrink.run", f"run {key} already ended ({st.phase.value}); cannot shrink it")
        if m is None:
            raise Precondition("shrink.run", f"run {key} is not malleable; only malleable runs shrink")
        if not (m.min_total <= desired <= m.max_total) or (desired - m.min_total) % m.step:
            raise ValidationError(
                "shrink.desiredTotalGPUs",
                f"must be in [{m.min_total}, {m.max_total}] and reachable from {m.min_total} in steps of {m.step}, got {desired}",
            )
        self.change_spec(SpecPut(replace(run, spec=replace(run.spec, malleable=replace(m, desired=desired)))))
        self._shrink_to(key, desired)

    def _shrink_to(self, key: str, desired: int) -> None:
        """Voluntary shrink: end the highest groups down to `desired`, never below min."""
        spec = self.runs[key].spec
        while True:
            groups = self._groups(key)
            width = sum(self._active(ls) for ls in groups.values())
            if not groups:
                return
            top = max(groups)
            gw = self._active(groups[top])
            if width <= desired or width - gw < max(desired, spec.min_width):
                return
            for lease in groups[top]:
                self._close(lease.name, "Shrink")

    def _grow(self) -> bool:
        changed = False
        running = sorted(self._malleable_running, key=lambda k: (self.terms(k).admitted, k))
        for key in running:
            if self._grow_tried.get(key) == self._world():
                continue
            spec = self.runs[key].spec
            m = spec.malleable
            assert m is not None
            width = self._width.get(key, 0)
            if width + m.step > m.desired:
                continue
            self._grow_tried[key] = self._world()
            needs = self._needs(key, width, width + m.step)
            cov = self._cover(key, needs, headroom_only=True)
            if cov.funded_gpus < cov.total_gpus:
                continue
            placed = self._pack(key, cov.groups)
            if placed is None:
                continue
            self._mint(key, placed, MintReason.GROW)
            self._grow_tried.pop(key, None)
            changed = True
        return changed
