"""Terminal pictures of `kubectl-runs`: the fleet (`top`) and an envelope's burn-down (`budgets burn`).

Part of `kubectl-runs` (`jobtree.cli.runs`). Pure functions of plain rows, so the remote
(gateway) and local (simulator) backends draw the same picture:
- `fleet(nodes, slots, color)`: per fabric domain a summary line (GPUs, how they are funded,
  free), then per node its GPU slots as one character each — owned `█`, shared `▓`, borrowed
  `▒`, unfunded `░`, spare `s`, free `·` — with `x` for a fenced node's and the node's state
  and holders after it. With `color`, each owner has its own colour (ANSI), so the picture
  says who holds what at a glance. `summary=True` draws only the domain lines (1,000 nodes
  stay one screen).
- `burn(envelope, ...)`: GPU-hours spent against the cap as a bar, then the remaining hours as
  a sparkline from now to the projected exhaustion at the current funded pace.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

CELL = {"owned": "█", "shared": "▓", "borrowed": "▒", "unfunded": "░", "spare": "s"}
FREE, FENCED = "·", "x"
_PALETTE = (32, 34, 35, 36, 33, 92, 94, 95, 96, 93, 91, 31)
SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class NodeRow:
    name: str
    gpus: int
    domain: str
    state: str = "Ready"


@dataclass(frozen=True)
class SlotRow:
    node: str
    index: int
    cls: str
    """owned | shared | borrowed | unfunded | spare"""
    owner: str
    run: str


def _color(owner: str) -> int:
    return _PALETTE[int(hashlib.sha1(owner.encode()).hexdigest()[:6], 16) % len(_PALETTE)]


def _paint(text: str, owner: str, on: bool) -> str:
    return f"\x1b[{_color(owner)}m{text}\x1b[0m" if on and owner else text


def _words(counts: Counter[str], free: int) -> str:
    parts = [f"{counts[c]} {c}" for c in ("owned", "shared", "borrowed", "unfunded", "spare") if counts[c]]
    return ", ".join([*parts, f"{free} free"])


def fleet(nodes: Sequence[NodeRow], slots: Sequence[SlotRow], *, color: bool = False, summary: bool = False) -> str:
    by_node: dict[str, dict[int, SlotRow]] = {}
    for s in slots:
        by_node.setdefault(s.node, {})[s.index] = s
    domains: dict[str, list[NodeRow]] = {}
    for n in sorted(nodes, key=lambda n: (n.domain, n.name)):
        domains.setdefault(n.domain, []).append(n)
    legend = "  ".join(f"{ch} {name}" for name, ch in CELL.items())
    lines = [f"{legend}  {FREE} free  {FENCED} fenced"]
    for domain, members in domains.items():
        counts: Counter[str] = Counter()
        free = total = 0
        for n in members:
            total += n.gpus
            held = by_node.get(n.name, {})
            counts.update(s.cls for s in held.values())
            if n.state != "Fenced":
                free += n.gpus - len(held)
        lines.append(f"{domain}  {total} GPUs: {_words(counts, free)}")
        if summary:
            continue
        width = max(len(n.name) for n in members)
        for n in members:
            held = by_node.get(n.name, {})
            cells = []
            for i in range(n.gpus):
                s = held.get(i)
                if n.state == "Fenced":
                    cells.append(FENCED)
                elif s is None:
                    cells.append(FREE)
                else:
                    cells.append(_paint(CELL.get(s.cls, "?"), s.owner, color))
            holders = sorted({f"{s.run} ({s.owner})" for s in held.values()})
            state = "" if n.state == "Ready" else f" [{n.state.lower()}]"
            lines.append(f"  {n.name:<{width}}  {''.join(cells)}{state}  {', '.join(holders)}".rstrip())
    return "\n".join(lines)


def sparkline(values: Sequence[float], top: float) -> str:
    if top <= 0:
        return ""
    return "".join(SPARK[min(len(SPARK) - 1, max(0, round(v / top * (len(SPARK) - 1))))] for v in values)


def burn(envelope: str, used: float, cap: float | None, funded_now: int, now: str, exhausts: str | None,
         width: int = 40) -> str:
    """An envelope's GPU-hours: spent against its cap, and the remaining hours from now to the
    projected exhaustion (`exhausts`) at `funded_now` GPUs."""
    if not cap:
        return f"{envelope}: {used:.2f} GPU-hours spent (no GPU-hours cap); {funded_now} GPUs funded now"
    spent = min(1.0, used / cap)
    bar = "█" * round(spent * width) + "·" * (width - round(spent * width))
    left = max(0.0, cap - used)
    head = f"{envelope}: [{bar}] {used:.2f} of {cap:g} GPU-hours ({100 * spent:.0f} %)"
    if left <= 0:
        return head + "\n  spent: the envelope funds nothing more this window"
    if funded_now <= 0:
        return head + f"\n  {left:.2f} GPU-hours left; nothing funded now, so they last"
    steps = [left - left * i / (width - 1) for i in range(width)]
    return (head + f"\n  remaining {sparkline(steps, left)} at {funded_now} GPUs: "
            f"{left:.2f} GPU-hours last until {exhausts} (from {now})")
