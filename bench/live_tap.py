"""A passive tap on a running jobtree's NATS bus: where a command's time goes, stage by stage.

Run by `live_throughput.py --tap` (or by hand) as its own process, connected as `admin`, which
may subscribe to every subject. It changes nothing on the bus: it only listens to requests and
to the replies sent to the services' inboxes (`_INBOX.jobtree.<c>.<service>.>`), and pairs them by
reply subject (every nats-py request has a unique reply subject). Recorded, with wall-clock
(time.time()) instants:
- `cmd`: a `bus.Command` to `jobtree.<c>.admission.command` and its `CommandReply` (sender =
  the service whose inbox the reply goes to: gateway, resolver, or `bench` for the benchmark's
  own admin connection);
- `commit`: an `AppendRequest` from admission to `jobtree.<c>.binder.commit` and its reply;
  the message id is kept, so a resent append (admission resends after 1 s) is visible;
- `ledger`: the binder's JetStream publish to the ledger stream and its PubAck (the fsync);
- `kv`: the binder's spec mirror puts into the runs/budgets/nodes buckets and their PubAcks;
- `api`: JetStream API requests that create consumers (a replay: a service (re)building its
  view) or fetch single messages (the binder looking back for a message id), by service.
On SIGINT/SIGTERM it writes everything as one JSON document to --out and exits.
`summarize(doc, t0, t1)` turns a window of it into per-stage statistics.

    .venv/bin/python bench/live_tap.py --nats URL --secrets D/secrets.json --cluster demo --out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nats

from jobtree.api.jobtree.v1 import bus_pb2 as bus


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


async def tap(url: str, seed: str, cluster: str, out: Path) -> None:
    base = f"jobtree.{cluster}"
    inbox = f"_INBOX.jobtree.{cluster}."
    nc = await nats.connect(url, nkeys_seed_str=seed, name="jobtree-bench-tap",
                            pending_size=256 * 1024 * 1024)
    pending: dict[str, tuple[str, float, str]] = {}
    done: dict[str, list[list[Any]]] = {"cmd": [], "commit": [], "ledger": [], "kv": []}
    api: list[list[Any]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def sender(reply: str) -> str:
        return reply[len(inbox):].split(".", 1)[0] if reply.startswith(inbox) else "other"

    async def on_cmd(msg: Any) -> None:
        if msg.reply:
            try:
                c = bus.Command.FromString(msg.data)
                what = c.WhichOneof("command") or "?"
            except Exception:
                what = "?"
            pending[msg.reply] = ("cmd", time.time(), what)

    async def on_commit(msg: Any) -> None:
        if msg.reply:
            try:
                mid = bus.AppendRequest.FromString(msg.data).msg_id
            except Exception:
                mid = "?"
            pending[msg.reply] = ("commit", time.time(), mid)

    async def on_ledger(msg: Any) -> None:
        if msg.reply:
            pending[msg.reply] = ("ledger", time.time(), str(len(msg.data)))

    async def on_kv(msg: Any) -> None:
        if msg.reply:
            pending[msg.reply] = ("kv", time.time(), msg.subject.split(".")[1])

    async def on_api(msg: Any) -> None:
        verb = "consumer.create" if ".CONSUMER.CREATE." in msg.subject else "msg.get"
        api.append([time.time(), verb, sender(msg.reply or ""), msg.subject])

    async def on_reply(msg: Any) -> None:
        got = pending.pop(msg.subject, None)
        if got is not None:
            kind, t, extra = got
            done[kind].append([t, time.time(), extra, sender(msg.subject)])

    await nc.subscribe(f"{base}.admission.command", cb=on_cmd)
    await nc.subscribe(f"{base}.binder.commit", cb=on_commit)
    await nc.subscribe(f"{base}.ledger.>", cb=on_ledger)
    for b in ("runs", "budgets", "nodes"):
        await nc.subscribe(f"$KV.jobtree_{cluster}_{b}.>", cb=on_kv)
    await nc.subscribe("$JS.API.CONSUMER.CREATE.>", cb=on_api)
    await nc.subscribe("$JS.API.STREAM.MSG.GET.>", cb=on_api)
    await nc.subscribe("$JS.API.DIRECT.GET.>", cb=on_api)
    for svc in ("gateway", "admission", "binder", "resolver", "bench"):
        await nc.subscribe(f"{inbox}{svc}.>", cb=on_reply)
    await nc.flush()
    out.with_suffix(".ready").write_text("ok\n")
    await stop.wait()
    await nc.close()
    out.write_text(json.dumps({"events": done, "api": api, "unanswered": len(pending)}))


def _stats(xs: list[float]) -> dict[str, float | int]:
    return {"n": len(xs), "mean_ms": round(1e3 * sum(xs) / len(xs), 2) if xs else float("nan"),
            "p50_ms": round(1e3 * percentile(xs, 50), 2), "p99_ms": round(1e3 * percentile(xs, 99), 2)}


def summarize(doc: dict[str, Any], t0: float, t1: float) -> dict[str, Any]:
    """Per-stage statistics of the requests answered within [t0, t1] (wall clock)."""
    ev = doc["events"]

    def window(kind: str) -> list[list[Any]]:
        return sorted((e for e in ev[kind] if t0 <= e[1] <= t1), key=lambda e: e[1])

    cmds = window("cmd")
    # admission answers one command at a time: its service time is the time from the later of
    # (arrival, previous reply) to the reply; the rest of the round trip is queueing
    all_cmds = sorted(ev["cmd"], key=lambda e: e[1])
    prev: dict[int, float] = {}
    last = 0.0
    for e in all_cmds:
        prev[id(e)] = last
        last = e[1]
    service = [e[1] - max(e[0], prev[id(e)]) for e in cmds]
    round_trip = [e[1] - e[0] for e in cmds]
    commits = window("commit")
    seen: Counter[str] = Counter(e[2] for e in ev["commit"])
    resent = sum(1 for e in commits if seen[e[2]] > 1)
    ledger, kv = window("ledger"), window("kv")
    api = [a for a in doc["api"] if t0 <= a[0] <= t1]
    span = max(t1 - t0, 1e-9)
    out: dict[str, Any] = {
        "commands": len(cmds), "by_sender": dict(Counter(e[3] for e in cmds)),
        "admission_round_trip": _stats(round_trip), "admission_service": _stats(service),
        "admission_busy_fraction": round(sum(service) / span, 3),
        "binder_commit": _stats([e[1] - e[0] for e in commits]), "commit_resends": resent,
        "ledger_append_ack": _stats([e[1] - e[0] for e in ledger]),
        "kv_mirror_put_ack": _stats([e[1] - e[0] for e in kv]),
        "kv_puts_per_commit": round(len(kv) / len(commits), 2) if commits else None,
        "api": dict(Counter(f"{a[2]} {a[1]}" for a in api)),
    }
    if commits and cmds:
        c = sum(e[1] - e[0] for e in commits) / len(commits)
        s = sum(service) / len(service)
        # mean service time not spent waiting for the binder: decoding, deciding, encoding, hops
        out["admission_own_ms"] = round(1e3 * (s - c * len(commits) / len(cmds)), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nats", required=True)
    ap.add_argument("--secrets", type=Path, required=True, help="the data directory's secrets.json")
    ap.add_argument("--cluster", default="demo")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    seed = json.loads(args.secrets.read_text())["nkeys"]["admin"]
    asyncio.run(tap(args.nats, seed, args.cluster, args.out))


if __name__ == "__main__":
    main()
