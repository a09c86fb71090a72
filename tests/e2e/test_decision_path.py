"""The write path against real processes: admission (the decision loop) and the binder (the only
ledger writer), each `jobtree serve NAME` on a real nats-server. The tests talk NATS to the
services and read the ledger stream themselves.

1. a batch commits as one ledger message, and the ledger alone replays to the decided view;
2. a retried command id commits once (also across an admission restart, and at the binder);
3. a command the core rejects answers INVALID_ARGUMENT naming the field and writes nothing;
4. the binder refuses a stale fencing epoch and a stale expected-last-sequence, writing nothing;
5. a restarted binder keeps the epoch fence (it reads the newest epoch back from the ledger);
6. commands arriving together are decided as a group and committed in fewer ledger messages,
   with the decisions a one-at-a-time play gives, refused commands in the group writing nothing;
7. the binder copies specs to the KV buckets after it answers, and a restarted binder repairs a
   copy that was lost;
8. a decision loop that fails (here: the binder answers garbage) answers UNAVAILABLE, gives the
   lock up and leads again once the bus is sound, in the same process;
9. past its queue bound admission refuses commands UNAVAILABLE at once, and decides the queued
   ones when it can.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from procs import (
    FLAVOR,
    T0,
    Reference,
    Services,
    append,
    assert_same_view,
    bring_up,
    budget,
    check_ledger,
    create_ledger,
    deliver,
    epochs,
    last_sequence,
    nodes,
    play,
    read_ledger,
    send,
    wait_admission,
    wait_binder,
)

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import subjects
from jobtree.bus.natsserver import NatsServer
from jobtree.core import facts as F
from jobtree.core.model import Locality, Malleable, Phase, Role, Run, RunSpec

pytestmark = pytest.mark.timeout(60)


def run(name: str, gpus: int, **spec: object) -> Run:
    return Run("default", name, RunSpec("org:a", FLAVOR, gpus, locality=Locality(group_gpus=8), **spec))  # type: ignore[arg-type]


def setup_batch(*extra: F.Command, command_id: str = "setup") -> bus.Command:
    """Four nodes in two fabric domains, a budget of 32 GPUs, and whatever `extra` holds."""
    cmds: list[F.Command] = [F.AddNode(n) for n in nodes(("A", "B"), 2)]
    cmds += [F.ApplyBudget(budget("team-a", "org:a", 32)), *extra]
    return convert.batch_to_proto(cmds, command_id=command_id, instant=T0)


def ok(reply: bus.CommandReply) -> int:
    assert not reply.HasField("error"), reply
    assert reply.ledger_sequence > 0, reply
    return reply.ledger_sequence


def clock_batch(instant: int, command_id: str, epoch: int) -> bus.LedgerBatch:
    return bus.LedgerBatch(entries=[convert.entry_to_proto((instant, F.ClockAdvanced()), command_id=command_id,
                                                           epoch=epoch)])


# --- 1 ---------------------------------------------------------------------------------------


def test_batch_commits_as_one_ledger_message(services: Services, nats_server: NatsServer, cluster: str) -> None:
    cmd = setup_batch(F.ApplyRun(run("train", 16)))

    async def scenario(nc: Client) -> None:
        await bring_up(services, nc)
        answered = (await deliver(nc, cluster, cmd)).reply
        seq = ok(answered)
        # The reply carries the run as the decision left it: what the gateway answers with.
        assert [(r.metadata.name, r.status.phase) for r in answered.runs] == [("train", "Running")], answered
        records = await read_ledger(nc, cluster)
        assert [r.sequence for r in records] == [seq] == [1], "the batch is not one ledger message"
        batch = records[0].batch
        assert {e.command_id for e in batch.entries} == {"setup"}
        kinds = [e.WhichOneof("fact") for e in batch.entries]
        assert kinds.count("node_state_put") == 4
        assert kinds.count("budget_put") == 1
        assert kinds.count("spec_put") == 1
        assert kinds.count("lease_minted") == 2  # 16 GPUs, groups of 8, one lease per node

        view = check_ledger(records, cluster, {"setup": seq})
        status = view.status["default/train"]
        assert status.phase is Phase.RUNNING, status
        assert status.bound_at == T0
        leases = view.open_by_run["default/train"]
        assert sum(x.gpus for x in leases.values()) == 16
        assert all(x.role is Role.ACTIVE and x.paid_by == ("team-a", "main") for x in leases.values())
        assert len({x.node for x in leases.values()}) == 2
        assert len({view.topo.nodes[x.node].domain for x in leases.values()}) == 1, "a group of 8 spans domains"

        ref = Reference(cluster)
        ref.play(cmd)
        assert_same_view(view, ref.view)

    play(nats_server.url, scenario)


# --- 2 ---------------------------------------------------------------------------------------


def test_retried_command_commits_once(services: Services, nats_server: NatsServer, cluster: str) -> None:
    first = setup_batch(F.ApplyRun(run("train", 8)))
    second = convert.command_to_proto(F.ApplyRun(run("eval", 8)), command_id="eval", instant=T0 + 60)

    async def scenario(nc: Client) -> None:
        await bring_up(services, nc)
        s1 = ok((await deliver(nc, cluster, first)).reply)
        # the same id again, at once: the original sequence, nothing written
        assert ok(await send(nc, cluster, first)) == s1
        assert await last_sequence(nc, cluster) == s1
        s2 = ok((await deliver(nc, cluster, second)).reply)
        assert s2 == s1 + 1
        # a retry after the ledger moved on (its view's sequence is stale now); its reply
        # carries no runs, since the view is not the state at the sequence it names
        again = await send(nc, cluster, first)
        assert ok(again) == s1 and not again.runs, again
        assert ok(await send(nc, cluster, second)) == s2
        assert await last_sequence(nc, cluster) == s2

        # a new decision loop remembers the committed ids from the ledger alone
        services["admission"].terminate()
        services.start("admission")
        await wait_admission(nc, cluster)
        assert ok(await send(nc, cluster, first)) == s1
        assert ok(await send(nc, cluster, second)) == s2
        assert await last_sequence(nc, cluster) == s2

        # the binder, too, commits a repeated message id once, with a current or a stale
        # expected sequence (a lost AppendReply retried)
        records = await read_ledger(nc, cluster)
        epoch = epochs(records)[-1]
        again = bus.AppendRequest(batch=records[-1].batch, epoch=epoch, msg_id="eval")
        for expected in (s2, s1):
            again.expected_last_sequence = expected
            done = await append(nc, cluster, again)
            assert not done.HasField("error"), done
            assert (done.sequence, done.duplicate) == (s2, True), done
        assert await last_sequence(nc, cluster) == s2

        records = await read_ledger(nc, cluster)
        view = check_ledger(records, cluster, {"setup": s1, "eval": s2})
        ref = Reference(cluster)
        ref.play(first)
        ref.play(second)
        assert_same_view(view, ref.view)

    play(nats_server.url, scenario)


# --- 3 ---------------------------------------------------------------------------------------


REFUSED_AS = {"bad-batch": bus.ERROR_CODE_NOT_FOUND, "bad-complete": bus.ERROR_CODE_FAILED_PRECONDITION}
"""The kind of refusal the core says each is (the rest are invalid input)."""


def test_rejected_command_writes_nothing(services: Services, nats_server: NatsServer, cluster: str) -> None:
    elastic = run("elastic", 16, malleable=Malleable(min_total=8, max_total=16, step=8, desired=16))
    setup = setup_batch(F.ApplyRun(elastic))
    rejected = {
        # the core refuses: not a width the run can shrink to
        "bad-shrink": (convert.command_to_proto(F.ShrinkRun("default/elastic", 12), command_id="bad-shrink",
                                                instant=T0 + 60), "shrink.desiredTotalGPUs"),
        # the second command of a batch is refused: the first (a new run) must not stick either
        "bad-batch": (convert.batch_to_proto([F.ApplyRun(run("ghost", 8)), F.CompleteRun("default/nope")],
                                             command_id="bad-batch", instant=T0 + 60), "batch.commands[1].complete"),
        # a workload report for a run that never started
        "bad-complete": (convert.batch_to_proto([F.ApplyRun(run("late", 32)), F.CompleteRun("default/late")],
                                                command_id="bad-complete", instant=T0 + 60),
                         "batch.commands[1].complete"),
        # the schema refuses: a run of no GPUs
        "bad-run": (convert.command_to_proto(F.ApplyRun(run("empty", 0)), command_id="bad-run", instant=T0 + 60),
                    "apply_run.run.spec.resources.totalGPUs"),
        # time runs forward only
        "bad-instant": (convert.command_to_proto(F.Tick(), command_id="bad-instant", instant=T0 - 60), "instant"),
    }
    valid = convert.command_to_proto(F.ShrinkRun("default/elastic", 8), command_id="shrink", instant=T0 + 120)

    async def scenario(nc: Client) -> None:
        await bring_up(services, nc)
        s1 = ok((await deliver(nc, cluster, setup)).reply)
        for name, (cmd, field) in rejected.items():
            for _ in range(2):  # a retried rejection is refused again, never committed
                reply = await send(nc, cluster, cmd)
                assert reply.command_id == name
                assert reply.error.code == REFUSED_AS.get(name, bus.ERROR_CODE_INVALID_ARGUMENT), (name, reply)
                assert reply.error.field_path == field, (name, reply.error)
                assert reply.error.problem, (name, reply.error)
                assert reply.ledger_sequence == 0, (name, reply)
                assert await last_sequence(nc, cluster) == s1, f"{name} wrote to the ledger"
        raw = await nc.request(f"jobtree.{cluster}.admission.command", b"\xff\xff\xff", timeout=5)
        garbage = bus.CommandReply.FromString(raw.data)
        assert garbage.error.code == bus.ERROR_CODE_INVALID_ARGUMENT, garbage
        assert await last_sequence(nc, cluster) == s1

        s2 = ok((await deliver(nc, cluster, valid)).reply)
        assert s2 == s1 + 1
        records = await read_ledger(nc, cluster)
        view = check_ledger(records, cluster, {"setup": s1, "shrink": s2})
        assert "default/ghost" not in view.runs and "default/late" not in view.runs
        assert sum(x.gpus for x in view.open_by_run["default/elastic"].values()) == 8
        ref = Reference(cluster)
        ref.play(setup)
        ref.play(valid)
        assert_same_view(view, ref.view)

    play(nats_server.url, scenario)


# --- 4 and 5 ---------------------------------------------------------------------------------


async def two_terms(services: Services, nc: Client, cluster: str) -> tuple[int, int, int]:
    """Two commits by two leader terms (admission restarted between them): (old epoch, new
    epoch, last sequence)."""
    await bring_up(services, nc)
    ok((await deliver(nc, cluster, setup_batch(F.ApplyRun(run("train", 8))))).reply)
    services["admission"].terminate()  # a graceful stop releases the lock: the next term begins at once
    services.start("admission")
    await wait_admission(nc, cluster)
    cmd = convert.command_to_proto(F.ApplyRun(run("eval", 8)), command_id="eval", instant=T0 + 60)
    last = ok((await deliver(nc, cluster, cmd)).reply)
    old, new = epochs(await read_ledger(nc, cluster))
    assert old < new, f"a new leader term must carry a higher epoch: {old} then {new}"
    terms = services["admission"].leader_terms()
    assert [e for e, _ in terms] == [old, new], terms
    return old, new, last


async def refused(nc: Client, cluster: str, req: bus.AppendRequest, code: int, last: int) -> bus.AppendReply:
    reply = await append(nc, cluster, req)
    assert reply.error.code == code, reply
    assert reply.sequence == 0 and not reply.duplicate, reply
    assert await last_sequence(nc, cluster) == last, "a refused append wrote to the ledger"
    return reply


def test_binder_refuses_stale_epoch_and_stale_sequence(
        services: Services, nats_server: NatsServer, cluster: str) -> None:
    async def scenario(nc: Client) -> None:
        old, new, last = await two_terms(services, nc, cluster)
        t = T0 + 120
        # a deposed leader (the old term), with an up-to-date view
        stale_epoch = bus.AppendRequest(batch=clock_batch(t, "rogue-1", old), epoch=old,
                                        expected_last_sequence=last, msg_id="rogue-1")
        await refused(nc, cluster, stale_epoch, bus.ERROR_CODE_STALE_EPOCH, last)
        # the current term, with a view one decision behind
        stale_view = bus.AppendRequest(batch=clock_batch(t, "rogue-2", new), epoch=new,
                                       expected_last_sequence=last - 1, msg_id="rogue-2")
        reply = await refused(nc, cluster, stale_view, bus.ERROR_CODE_CONFLICT, last)
        assert reply.last_sequence == last, reply
        # and one ahead of the ledger
        stale_view.expected_last_sequence = last + 1
        await refused(nc, cluster, stale_view, bus.ERROR_CODE_CONFLICT, last)

        # the decision loop is unaffected: its next command commits
        cmd = convert.command_to_proto(F.ApplyRun(run("more", 8)), command_id="more", instant=t)
        s3 = ok((await deliver(nc, cluster, cmd)).reply)
        assert s3 == last + 1
        records = await read_ledger(nc, cluster)
        assert epochs(records) == [old, new, new]
        check_ledger(records, cluster, {"setup": 1, "eval": 2, "more": 3})

    play(nats_server.url, scenario)


def test_binder_restart_keeps_the_epoch_fence(services: Services, nats_server: NatsServer, cluster: str) -> None:
    async def scenario(nc: Client) -> None:
        old, new, last = await two_terms(services, nc, cluster)
        t = T0 + 120
        binder = services["binder"]
        for stop in (binder.terminate, binder.kill):
            stop()
            services.start("binder")
            await wait_binder(nc, cluster)
            # the new binder process has seen no append: only the ledger tells it the fence
            stale = bus.AppendRequest(batch=clock_batch(t, "rogue", old), epoch=old,
                                      expected_last_sequence=last, msg_id="rogue")
            await refused(nc, cluster, stale, bus.ERROR_CODE_STALE_EPOCH, last)
        assert len(binder.pids) == 3
        cmd = convert.command_to_proto(F.ApplyRun(run("more", 8)), command_id="more", instant=t)
        assert ok((await deliver(nc, cluster, cmd)).reply) == last + 1
        records = await read_ledger(nc, cluster)
        assert epochs(records) == [old, new, new]
        check_ledger(records, cluster, {"setup": 1, "eval": 2, "more": 3})

    play(nats_server.url, scenario)


# --- 6 ---------------------------------------------------------------------------------------


def test_commands_arriving_together_commit_as_groups(
        services: Services, nats_server: NatsServer, cluster: str) -> None:
    t = T0 + 60
    burst = [convert.command_to_proto(F.ApplyRun(run(f"r{i:02d}", 8)), command_id=f"r{i:02d}", instant=t)
             for i in range(40)]
    refusals = {
        # lone and refused, changing nothing: the group goes on without a rebuild
        "nope": (convert.command_to_proto(F.CompleteRun("default/nope"), command_id="nope", instant=t), "complete"),
        # refused after moving the clock: the view is rebuilt and the group decided again without it
        "later": (convert.command_to_proto(F.CompleteRun("default/nope"), command_id="later", instant=t + 30),
                  "complete"),
        # refused after its first command applied: likewise
        "ghost": (convert.batch_to_proto([F.ApplyRun(run("ghost", 8)), F.CompleteRun("default/nope")],
                                         command_id="ghost", instant=t), "batch.commands[1].complete"),
    }
    sends = list(burst)
    for k, (cmd, _) in enumerate(refusals.values()):
        sends.insert(10 * (k + 1), cmd)

    async def scenario(nc: Client) -> None:
        await bring_up(services, nc)
        s1 = ok((await deliver(nc, cluster, setup_batch())).reply)
        replies = await asyncio.gather(*(send(nc, cluster, cmd) for cmd in sends))
        by_id = {r.command_id: r for r in replies}
        for name, (_, field) in refusals.items():  # each names a run that does not exist
            assert by_id[name].error.code == bus.ERROR_CODE_NOT_FOUND, by_id[name]
            assert by_id[name].error.field_path == field, by_id[name].error
        acked = {"setup": s1} | {c.command_id: ok(by_id[c.command_id]) for c in burst}
        records = await read_ledger(nc, cluster)
        assert len(records) - 1 < len(burst), f"{len(burst)} commands sent together took {len(records) - 1} messages"
        view = check_ledger(records, cluster, acked)
        assert "default/ghost" not in view.runs
        assert view.now == t, "a refused command moved the clock"
        # the in-process play of the accepted commands, in the order the ledger holds them
        order = [cid for r in records for cid in dict.fromkeys(e.command_id for e in r.batch.entries)]
        ref = Reference(cluster)
        ref.play(setup_batch())
        for cid in order[1:]:
            ref.play(next(c for c in burst if c.command_id == cid))
        assert_same_view(view, ref.view)
        running = [k for k, st in view.status.items() if st.phase is Phase.RUNNING]
        assert len(running) == 4, "32 GPUs of budget and fleet hold four 8-GPU runs"

    play(nats_server.url, scenario)


# --- 7 ---------------------------------------------------------------------------------------


async def bucket_keys(nc: Client, cluster: str, name: str) -> dict[str, bytes]:
    kv = await nc.jetstream().key_value(subjects.bucket(cluster, name))
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return {}
    out: dict[str, bytes] = {}
    for k in keys:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):  # deleted since it was listed
            out[k] = (await kv.get(k)).value or b""
    return out


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


def test_binder_mirrors_specs_and_repairs_lost_copies(
        services: Services, nats_server: NatsServer, cluster: str) -> None:
    keep, gone = run("keep", 8), run("gone", 8)
    setup = setup_batch(F.ApplyRun(keep), F.ApplyRun(gone))
    delete = convert.command_to_proto(F.DeleteRun("default/gone"), command_id="delete", instant=T0 + 60)

    async def scenario(nc: Client) -> None:
        await bring_up(services, nc)
        ok((await deliver(nc, cluster, setup)).reply)
        ok((await deliver(nc, cluster, delete)).reply)
        want_runs = {subjects.kv_key("default", "keep"): convert.run_to_proto(keep).SerializeToString()}

        async def mirrored() -> bool:
            return (await bucket_keys(nc, cluster, "runs") == want_runs
                    and len(await bucket_keys(nc, cluster, "nodes")) == 4
                    and set(await bucket_keys(nc, cluster, "budgets")) == {subjects.kv_key("team-a")})

        await eventually(mirrored, "the spec buckets do not hold the ledger's specs")
        services["binder"].kill()
        runs = await nc.jetstream().key_value(subjects.bucket(cluster, "runs"))
        await runs.delete(subjects.kv_key("default", "keep"))  # a copy lost with the binder
        await runs.put(subjects.kv_key("default", "gone"), b"stale")  # a deletion that never made it
        services.start("binder")
        await wait_binder(nc, cluster)
        await eventually(mirrored, "a restarted binder did not repair the spec buckets from the ledger")

    play(nats_server.url, scenario)


# --- 8 ---------------------------------------------------------------------------------------


def test_a_failed_decision_loop_answers_and_leads_again(
        services: Services, nats_server: NatsServer, cluster: str) -> None:
    setup = setup_batch(F.ApplyRun(run("train", 8)))

    async def scenario(nc: Client) -> None:
        await create_ledger(nc, cluster)
        # an impostor binder: every append is answered with bytes that are not an AppendReply
        async def garbage(msg: Msg) -> None:
            await msg.respond(b"\xff\xff\xff")

        impostor = await nc.subscribe(f"jobtree.{cluster}.binder.commit", cb=garbage)
        services.start("admission")
        await wait_admission(nc, cluster)
        reply = await send(nc, cluster, setup, timeout=5)
        assert reply.error.code == bus.ERROR_CODE_UNAVAILABLE, reply  # answered, not left to time out
        adm = services["admission"]

        async def failed() -> bool:
            return any(d.get("msg", "").startswith("the leader term failed") for d in adm.log_lines())

        await eventually(failed, "admission did not report the failed term")
        await impostor.unsubscribe()
        services.start("binder")
        await wait_binder(nc, cluster)
        seq = ok((await deliver(nc, cluster, setup)).reply)
        assert adm.running and len(adm.pids) == 1, "the same process leads again"
        terms = adm.leader_terms()
        assert len(terms) >= 2 and terms[-1][0] > terms[0][0], terms
        records = await read_ledger(nc, cluster)
        view = check_ledger(records, cluster, {"setup": seq})
        ref = Reference(cluster)
        ref.play(setup)
        assert_same_view(view, ref.view)

    play(nats_server.url, scenario)


# --- 9 ---------------------------------------------------------------------------------------


def test_admission_refuses_beyond_its_queue_bound(services: Services, nats_server: NatsServer, cluster: str) -> None:
    setup = setup_batch()
    burst = [convert.command_to_proto(F.ApplyRun(run(f"q{i:02d}", 8)), command_id=f"q{i:02d}", instant=T0 + 60)
             for i in range(12)]

    async def scenario(nc: Client) -> None:
        await create_ledger(nc, cluster)

        async def hold(msg: Msg) -> None:  # a binder that never answers: the first group waits
            pass

        holder = await nc.subscribe(f"jobtree.{cluster}.binder.commit", cb=hold)
        services.start("admission", env={"JOBTREE_ADMISSION_MAX_QUEUE": "4"})
        await wait_admission(nc, cluster)
        first = asyncio.create_task(send(nc, cluster, setup, timeout=30))
        await asyncio.sleep(0.3)  # its group is committing (and waiting)
        sent = [asyncio.create_task(send(nc, cluster, cmd, timeout=30)) for cmd in burst]
        deadline = asyncio.get_running_loop().time() + 3.0
        while sum(t.done() for t in sent) < len(burst) - 4 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        done = {t for t in sent if t.done()}
        refused = [t.result() for t in done]
        assert len(refused) == len(burst) - 4, [t.result() for t in done]  # answered at once
        assert all(r.error.code == bus.ERROR_CODE_UNAVAILABLE and "overloaded" in r.error.problem
                   for r in refused), refused
        assert not first.done()
        await holder.unsubscribe()  # the real binder: admission's next resend reaches it
        services.start("binder")
        assert ok(await first) == 1
        decided = [await t for t in sent if t not in done]
        assert len(decided) == 4 and all(not r.HasField("error") for r in decided), decided
        records = await read_ledger(nc, cluster)
        check_ledger(records, cluster, {"setup": 1} | {r.command_id: r.ledger_sequence for r in decided})

    play(nats_server.url, scenario)
