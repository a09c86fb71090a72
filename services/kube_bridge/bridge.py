"""The kube-bridge's reconcilers: Kubernetes objects in, jobtree's decisions out.

Part of the kube-bridge service (see its package docstring for the contract).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib

import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, subjects
from jobtree.bus.follower import Follower
from jobtree.bus.runtime import ServiceContext
from jobtree.core import facts
from jobtree.core.errors import ValidationError
from jobtree.core.family import Family
from jobtree.core.model import Node, NodeState, Phase
from jobtree.services.kube_bridge import objects as o
from jobtree.services.kube_bridge.kube import Informer, Json, Kube, KubeError, Resource, WorkQueue

RUNS = Resource(o.GROUP, o.VERSION, "runs", True)
BUDGETS = Resource(o.GROUP, o.VERSION, "budgets", False)
LEASES = Resource(o.GROUP, o.VERSION, "gpuleases", True)
RESERVATIONS = Resource(o.GROUP, o.VERSION, "reservations", True)
NAMESPACES = Resource("", "v1", "namespaces", False)
NODES = Resource("", "v1", "nodes", False)
PODS = Resource("", "v1", "pods", True)
SERVICES = Resource("", "v1", "services", True)
EVENTS = Resource("", "v1", "events", True)

REFUSED = {bus.ERROR_CODE_INVALID_ARGUMENT: "Invalid", bus.ERROR_CODE_FAILED_PRECONDITION: "FailedPrecondition",
           bus.ERROR_CODE_NOT_FOUND: "NotFound", bus.ERROR_CODE_PERMISSION_DENIED: "OwnerForbidden"}
"""Admission's refusals that no retry changes: the Run says so and waits for a new generation."""
TERMINAL = (Phase.COMPLETED, Phase.FAILED)
WARNINGS = ("RunPreempted", "RunReclaimed", "RunRequeued", "RunFailed", "LendingRecalled")


class Retry(Exception):
    """The key is retried with backoff (the bus or the API server did not answer)."""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Bridge:
    def __init__(self, ctx: ServiceContext, kube: Kube, follower: Follower, *, node_grace: float = 40.0,
                 pod_grace: int = 30) -> None:
        self.ctx, self.kube, self.follower = ctx, kube, follower
        self.node_grace, self.pod_grace = node_grace, pod_grace
        self.queue = WorkQueue()
        self.commands_sent = 0
        self.owned: dict[str, tuple[str, int]] = {}
        """Run key -> (uid, sequence) of the newest ApplyRun the bridge committed for it."""
        self.runs = Informer(kube, RUNS, lambda k, _: self.queue.add(("run", f"{k[0]}/{k[1]}")))
        self.budgets = Informer(kube, BUDGETS, lambda k, _: self.queue.add(("budget", k[1])))
        self.namespaces = Informer(kube, NAMESPACES, self._namespace_changed)
        self.nodes = Informer(kube, NODES, lambda k, _: self.queue.add(("node", k[1])))
        self.pods = Informer(kube, PODS, self._labelled_changed, labels=o.RUN_LABEL)
        self.leases = Informer(kube, LEASES, self._labelled_changed, labels=o.RUN_LABEL)
        self.reservations = Informer(kube, RESERVATIONS, self._labelled_changed, labels=o.RUN_LABEL)
        self.informers = [self.namespaces, self.budgets, self.runs, self.nodes, self.pods, self.leases,
                          self.reservations]
        self.leases_by_run: dict[str, set[str]] = {}
        self.reservations_by_run: dict[str, set[str]] = {}
        self._services_made: set[tuple[str, str]] = set()
        self.funding_seen: dict[str, tuple[tuple[str, int], ...]] = {}
        """Run key -> its funding split (class, GPUs) after the last ledger message."""

    # --- triggers ------------------------------------------------------------------------

    def _namespace_changed(self, key: tuple[str, str], _: Json | None) -> None:
        for ns, name in list(self.runs.cache):
            if ns == key[1]:
                self.queue.add(("run", f"{ns}/{name}"))

    def _labelled_changed(self, key: tuple[str, str], obj: Json | None) -> None:
        run = ((obj or {}).get("metadata", {}).get("labels") or {}).get(o.RUN_LABEL)
        if run is None:  # deleted: the cache had it; the run label is in its name's prefix at worst
            for ns, name in list(self.runs.cache):
                if ns == key[0]:
                    self.queue.add(("run", f"{ns}/{name}"))
            return
        self.queue.add(("run", f"{key[0]}/{run}"))

    def _index(self) -> None:
        cl = self.follower.cluster
        for lease in cl.leases.values():
            self.leases_by_run.setdefault(lease.run, set()).add(lease.name)
        for res in cl.reservations.values():
            self.reservations_by_run.setdefault(res.run, set()).add(res.name)
        for command_id, seq in self.follower.command_ids.items():
            self._note_command(command_id, seq)

    def _note_command(self, command_id: str, seq: int) -> None:
        got = o.parse_run_command_id(command_id)
        if got is not None and seq >= self.owned.get(got[0], ("", 0))[1]:
            self.owned[got[0]] = (got[1], seq)

    def on_batch(self, seq: int, batch: bus.LedgerBatch) -> None:
        """Follower listener: enqueue what a committed batch touched, queue its Events."""
        for entry in batch.entries:
            if entry.command_id:
                self._note_command(entry.command_id, seq)
            which = entry.WhichOneof("fact")
            if which == "lease_minted":
                lease = entry.lease_minted.lease
                key = f"{lease.metadata.namespace}/{lease.spec.run_ref}"
                self.leases_by_run.setdefault(key, set()).add(lease.metadata.name)
                self.queue.add(("run", key))
                if lease.spec.paid_by.budget:  # its headroom moved
                    self.queue.add(("budget", lease.spec.paid_by.budget))
            elif which == "lease_closed":
                self.queue.add(("run", o.lease_run_key(entry.lease_closed.name)))
                closed = self.follower.cluster.leases.get(entry.lease_closed.name)
                if closed is not None and closed.paid_by is not None:
                    self.queue.add(("budget", closed.paid_by[0]))
            elif which == "reservation_put":
                res = entry.reservation_put.reservation
                key = f"{res.metadata.namespace}/{res.spec.run_ref}"
                self.reservations_by_run.setdefault(key, set()).add(res.metadata.name)
                self.queue.add(("run", key))
            elif which in ("run_status_put", "spec_put", "spec_deleted"):
                ref = (entry.run_status_put.run if which == "run_status_put" else
                       entry.spec_deleted.run if which == "spec_deleted" else None)
                key = convert.run_key(ref) if ref is not None else (
                    f"{entry.spec_put.run.metadata.namespace or 'default'}/{entry.spec_put.run.metadata.name}")
                self.queue.add(("run", key))
            elif which == "node_state_put":
                self.queue.add(("node", entry.node_state_put.node.name))
            elif which == "budget_put":
                self.queue.add(("budget", entry.budget_put.budget.metadata.name))
        self._funding_moved()

    def _funding_moved(self) -> None:
        """Enqueue the runs whose funding split changed with no fact of their own (a lender's
        claim recalls what they borrowed; a window or a GPU-hours cap turns them unfunded)."""
        cl = self.follower.cluster
        now: dict[str, tuple[tuple[str, int], ...]] = {}
        for key, leases in cl.open_by_run.items():
            split: dict[str, int] = {}
            for lease in leases.values():
                cls = cl.funding.class_of(lease.name).value
                split[cls] = split.get(cls, 0) + lease.gpus
            now[key] = tuple(sorted(split.items()))
        for key in set(now) | set(self.funding_seen):
            if now.get(key) != self.funding_seen.get(key) and key in self.owned:
                self.queue.add(("run", key))
        self.funding_seen = now

    # --- the loop ------------------------------------------------------------------------

    async def run(self, workers: int = 2) -> None:
        tasks = [asyncio.ensure_future(inf.run()) for inf in self.informers]
        try:
            await asyncio.gather(*(inf.synced.wait() for inf in self.informers))
            self._index()
            self.follower.listeners.append(self.on_batch)
            self.resync()
            tasks += [asyncio.ensure_future(self._worker()) for _ in range(workers)]
            tasks.append(asyncio.ensure_future(self._emit_events()))
            tasks.append(asyncio.ensure_future(self._periodic()))
            await self.ctx.stopping.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def resync(self) -> None:
        for ns, name in list(self.runs.cache):
            self.queue.add(("run", f"{ns}/{name}"))
        for key in list(self.owned):
            self.queue.add(("run", key))
        for _, name in list(self.budgets.cache):
            self.queue.add(("budget", name))
        for _, name in list(self.nodes.cache):
            self.queue.add(("node", name))
        for name, node in self.follower.cluster.topo.nodes.items():
            if node.label("cluster") == self.ctx.cluster:
                self.queue.add(("node", name))

    async def _periodic(self) -> None:
        """A full resync now and then, and after a queue overflow (level-based: nothing is lost)."""
        while True:
            await asyncio.sleep(5.0 if self.queue.overflowed else 60.0)
            self.queue.overflowed = False
            self.resync()

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                if key[0] == "run":
                    await self.reconcile_run(key[1])
                elif key[0] == "budget":
                    await self.reconcile_budget(key[1])
                else:
                    await self.reconcile_node(key[1])
                self.queue.forget(key)
            except (Retry, KubeError, nats.errors.Error, TimeoutError) as exc:
                delay = self.queue.retry(key)
                self.ctx.log.info("reconcile deferred", extra={"fields": {"key": list(key), "error": str(exc),
                                                                         "retry_in": delay}})
            except Exception:
                delay = self.queue.retry(key)
                self.ctx.log.warning("reconcile failed", exc_info=True,
                                     extra={"fields": {"key": list(key), "retry_in": delay}})

    # --- commands ------------------------------------------------------------------------

    async def command(self, cmd: facts.Command, command_id: str) -> bus.CommandReply:
        """Send one command to admission under `command_id` and wait until the view holds it;
        the reply (its error set when admission refused). Retry when nobody answers."""
        msg = convert.command_to_proto(cmd, command_id=command_id)
        msg.identity = "service:kube-bridge"  # what it writes, it writes for the cluster's objects
        subject = subjects.request(self.ctx.cluster, "admission", "command")
        try:
            answer = await self.ctx.nc.request(subject, codec.encode(msg), timeout=10.0, headers=codec.headers(msg))
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            raise Retry(f"admission did not answer {command_id}: {exc!r}") from None
        self.commands_sent += 1
        if (answer.headers or {}).get(codec.TYPE_HEADER) == codec.type_name(bus.Error):
            reply = bus.CommandReply(command_id=command_id)
            reply.error.CopyFrom(codec.decode(answer.data, bus.Error))
        else:
            reply = codec.decode(answer.data, bus.CommandReply)
        if reply.HasField("error") and reply.error.code != bus.ERROR_CODE_UNSPECIFIED:
            if reply.error.code not in REFUSED:
                raise Retry(f"admission: {reply.error.problem}")
            return reply
        if reply.ledger_sequence:
            await self.follower.wait_for(reply.ledger_sequence, timeout=10.0)
        self.ctx.log.info("command committed", extra={"fields": {"command_id": command_id,
                                                                 "ledger_sequence": reply.ledger_sequence}})
        return reply

    # --- runs ----------------------------------------------------------------------------

    async def reconcile_run(self, key: str) -> None:
        ns, name = key.split("/", 1)
        cr = self.runs.cache.get((ns, name))
        cl = self.follower.cluster
        owned = self.owned.get(key)
        live = key in cl.runs and cl.status[key].phase not in TERMINAL
        if cr is None or cr["metadata"].get("deletionTimestamp"):
            if owned is not None and key in cl.runs:
                await self.command(facts.DeleteRun(key), o.run_delete_command_id(key, owned[0]))
            return
        uid, gen = cr["metadata"]["uid"], int(cr["metadata"].get("generation", 1))
        if owned is not None and owned[0] != uid and live:  # the object was deleted and made anew
            await self.command(facts.DeleteRun(key), o.run_delete_command_id(key, owned[0]))
        cmd_id = o.run_command_id(key, uid, gen)
        if cmd_id not in self.follower.command_ids and not await self._submit(key, cr, cmd_id):
            return
        if key not in cl.runs:
            return
        await self._write_status(RUNS, cr, o.run_status(cl, key, cr, _now()))
        await self._mirror_leases(key, cr)
        if (cr.get("spec") or {}).get("roles"):
            await self._pods(key, cr)

    async def _submit(self, key: str, cr: Json, cmd_id: str) -> bool:
        """Send this generation of the Run to admission; False (and a refused status) if it may not."""
        ns = cr["metadata"]["namespace"]
        namespace = self.namespaces.cache.get(("", ns))
        family = Family(self.follower.cluster.budgets.values())
        problem = o.owner_problem(cr, namespace, family)
        reason = "OwnerForbidden"
        if problem is None:
            problem, reason = o.roles_problem(cr), "Invalid"
        parsed = None
        if problem is None:
            bound = o.namespace_owners(namespace)
            try:
                parsed = convert.parse_manifest(o.run_manifest(cr, bound[0] if len(bound) == 1 else None))
            except ValidationError as err:
                problem = f"{err.path}: {err.problem}" if err.path else err.problem
        if problem is None and parsed is not None:
            reply = await self.command(facts.ApplyRun(parsed.model), cmd_id)  # type: ignore[arg-type]
            if not reply.HasField("error") or reply.error.code == bus.ERROR_CODE_UNSPECIFIED:
                return True
            reason = REFUSED[reply.error.code]
            path = reply.error.field_path.removeprefix("apply_run.run.").removeprefix("run.")
            problem = f"{path}: {reply.error.problem}" if path else reply.error.problem
        assert problem is not None
        await self._write_status(RUNS, cr, o.refused_status(cr, reason, problem, _now()))
        with contextlib.suppress(KubeError):
            await self._event(cr, "Warning", reason, problem, f"refused-{cr['metadata'].get('generation', 1)}")
        return False

    async def _write_status(self, res: Resource, cr: Json, status: Json) -> None:
        """Replace the object's status through the status subresource, with its resourceVersion
        (a conflict re-reads the object and tries again)."""
        for _ in range(5):
            if (cr.get("status") or {}) == status:
                return
            meta = cr["metadata"]
            body = {**cr, "status": status}
            try:
                await self.kube.request("PUT", res.path(meta.get("namespace"), meta["name"], "status"), body=body)
                return
            except KubeError as err:
                if err.code == 404:
                    return
                if err.code != 409:
                    raise
            cr = await self.kube.request("GET", res.path(meta.get("namespace"), meta["name"]))
        raise Retry(f"status of {cr['metadata']['name']}: conflicts kept coming")

    async def _mirror_leases(self, key: str, cr: Json) -> None:
        cl = self.follower.cluster
        ns = cr["metadata"]["namespace"]
        for name in sorted(self.leases_by_run.get(key, ())):
            lease = cl.leases.get(name)
            if lease is None:
                continue
            want = o.lease_object(lease, cr)
            have = self.leases.cache.get((ns, name))
            if have is None:
                have = await self._create(LEASES, want)
            if want.get("status") and (have.get("status") or {}) != want["status"]:
                await self._write_status(LEASES, have, want["status"])
        for name in sorted(self.reservations_by_run.get(key, ())):
            res = cl.reservations.get(name)
            if res is None:
                continue
            want = o.reservation_object(res, cr)
            have = self.reservations.cache.get((ns, name))
            if have is None:
                have = await self._create(RESERVATIONS, want)
            if (have.get("status") or {}) != want.get("status", {}):
                await self._write_status(RESERVATIONS, have, want.get("status", {}))

    async def _create(self, res: Resource, obj: Json) -> Json:
        meta = obj["metadata"]
        try:
            return await self.kube.request("POST", res.path(meta.get("namespace")), body=obj)
        except KubeError as err:
            if err.code != 409:
                raise
            return await self.kube.request("GET", res.path(meta.get("namespace"), meta["name"]))

    async def _pods(self, key: str, cr: Json) -> None:
        """The run's workload pods: one set per open Active lease; pods of closed leases go."""
        cl = self.follower.cluster
        ns, run = key.split("/", 1)
        leases = o.open_active(cl, key)
        rank0 = o.pod_name(leases[0].name, leases[0].group) if leases else ""
        want: dict[str, Json] = {}
        for rank, lease in enumerate(leases):
            for pod in o.pods_for_lease(cr, lease, rank, len(leases), rank0):
                want[pod["metadata"]["name"]] = pod
        if want and (ns, o.service_name(run)) not in self._services_made:
            await self._create(SERVICES, o.gang_service(cr))
            self._services_made.add((ns, o.service_name(run)))
        have = {name: pod for (pns, name), pod in self.pods.cache.items()
                if pns == ns and pod["metadata"].get("labels", {}).get(o.RUN_LABEL) == run}
        for name, pod in want.items():
            if name not in have:
                await self._create(PODS, pod)
        for name, pod in have.items():
            finished = pod.get("status", {}).get("phase") in ("Succeeded", "Failed")  # kept for their logs
            if name not in want and not finished and not pod["metadata"].get("deletionTimestamp"):
                with contextlib.suppress(KubeError):
                    await self.kube.request("DELETE", PODS.path(ns, name),
                                            query={"gracePeriodSeconds": str(self.pod_grace)})
        st = cl.status[key]
        if st.phase is not Phase.RUNNING or not want or any(n not in have for n in want):
            return
        phases = [have[n].get("status", {}).get("phase") for n in want]
        uid, gen = cr["metadata"]["uid"], int(cr["metadata"].get("generation", 1))
        if any(p == "Failed" for p in phases):
            await self.command(facts.FailRun(key), o.run_end_command_id(key, uid, gen, f"fail-{st.generation}"))
        elif all(p == "Succeeded" for p in phases):
            await self.command(facts.CompleteRun(key),
                               o.run_end_command_id(key, uid, gen, f"complete-{st.generation}"))

    # --- events --------------------------------------------------------------------------

    async def _event(self, cr: Json, kind: str, reason: str, message: str, suffix: str) -> None:
        meta = cr["metadata"]
        digest = hashlib.sha1(f"{meta['uid']}/{suffix}".encode()).hexdigest()[:12]
        name = f"{meta['name']}.{digest}"
        now = _now()
        event = {"apiVersion": "v1", "kind": "Event",
                 "metadata": {"name": name, "namespace": meta["namespace"]},
                 "involvedObject": {"apiVersion": cr.get("apiVersion"), "kind": cr.get("kind"),
                                    "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
                 "type": kind, "reason": reason, "message": message[:1024], "count": 1,
                 "firstTimestamp": now, "lastTimestamp": now,
                 "source": {"component": "jobtree-kube-bridge"}, "reportingComponent": "jobtree-kube-bridge"}
        try:
            await self.kube.request("POST", EVENTS.path(meta["namespace"]), body=event)
        except KubeError as err:
            if err.code != 409:  # 409: made before (a retry)
                raise

    async def _emit_events(self) -> None:
        """Kubernetes Events on Runs from the cluster's events stream (the same events the notifier
        delivers), through the durable consumer `kube-bridge`: an event is acknowledged once its
        Kubernetes Event exists (named from the event id, so a redelivery creates nothing twice)."""
        sub = None
        while sub is None:
            try:
                sub = await self.ctx.js.pull_subscribe(
                    subjects.events_filter(self.ctx.cluster, "run"), durable="kube-bridge",
                    stream=subjects.events_stream(self.ctx.cluster),
                    config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_ack_pending=10_000,
                                          deliver_policy=DeliverPolicy.NEW))
            except (nats.errors.Error, TimeoutError) as exc:
                self.ctx.log.info("waiting for the events stream", extra={"fields": {"error": repr(exc)}})
                await asyncio.sleep(1.0)
        while True:
            try:
                msgs = await sub.fetch(64, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except nats.errors.Error:
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                event = codec.decode(msg.data, bus.Event, msg.headers)
                cr = self.runs.cache.get((event.namespace, event.run))
                try:
                    if cr is not None:
                        kind = "Warning" if event.kind in WARNINGS else "Normal"
                        await self._event(cr, kind, event.kind.removeprefix("Run"), event.message, event.id)
                    await msg.ack()
                except KubeError:
                    await msg.nak(delay=2.0)

    # --- budgets -------------------------------------------------------------------------

    async def reconcile_budget(self, name: str) -> None:
        cr = self.budgets.cache.get(("", name))
        if cr is None:
            return
        cl = self.follower.cluster
        cmd_id = o.budget_command_id(cr)
        now = _now()
        old = (cr.get("status") or {}).get("conditions") or []
        if cmd_id not in self.follower.command_ids:
            problem = None
            try:
                parsed = convert.parse_manifest(o.budget_manifest(cr))
            except ValidationError as err:
                problem = f"{err.path}: {err.problem}" if err.path else err.problem
            if problem is None:
                reply = await self.command(facts.ApplyBudget(parsed.model), cmd_id)  # type: ignore[arg-type]
                if reply.HasField("error") and reply.error.code != bus.ERROR_CODE_UNSPECIFIED:
                    problem = f"{reply.error.field_path}: {reply.error.problem}".lstrip(": ")
            if problem is not None:
                await self._write_status(BUDGETS, cr, {
                    "observedGeneration": int(cr["metadata"].get("generation", 1)),
                    "conditions": [o.condition("Accepted", False, "Invalid", problem, old, now)]})
                return
        if name not in cl.budgets:
            return
        status = o.budget_status(cl, name, cr)
        status["conditions"] = [o.condition("Accepted", True, "Accepted", "jobtree holds this budget", old, now)]
        await self._write_status(BUDGETS, cr, status)

    # --- nodes ---------------------------------------------------------------------------

    async def reconcile_node(self, name: str) -> None:
        obj = self.nodes.cache.get(("", name))
        cl = self.follower.cluster
        have = cl.topo.nodes.get(name)
        if obj is None or o.node_gpus(obj) == 0:
            if have is not None and have.label("cluster") == self.ctx.cluster and have.state is not NodeState.FENCED:
                await self.command(facts.FailNode(name), o.node_command_id(name, "gone", "fence",
                                                                           str(self.follower.sequence)))
            return
        facts_ = o.node_of(obj, self.ctx.cluster, datetime.datetime.now(datetime.UTC), self.node_grace)
        meta = obj["metadata"]
        ident = (meta.get("uid", ""), meta.get("resourceVersion", ""))
        if facts_.wait > 0:
            self.queue.add_after(("node", name), facts_.wait + 0.05)
        if have is None or (have.state is NodeState.FENCED and facts_.want is not NodeState.FENCED):
            await self.command(facts.AddNode(Node(facts_.node.name, facts_.node.gpus, facts_.node.labels)),
                               o.node_command_id(name, ident[0], "add", ident[1]))
            have = cl.topo.nodes.get(name)
            if have is None:
                raise Retry(f"node {name} is not in the view yet")
        if facts_.want is NodeState.FENCED and have.state is not NodeState.FENCED:
            self.ctx.log.info("fencing node", extra={"fields": {"node": name, "why": facts_.why}})
            await self.command(facts.FailNode(name), o.node_command_id(name, ident[0], "fence", ident[1]))
        elif facts_.want is NodeState.CORDONED and have.state is NodeState.READY:
            await self.command(facts.CordonNode(name), o.node_command_id(name, ident[0], "cordon", ident[1]))
        elif facts_.want is NodeState.READY and have.state is NodeState.CORDONED:
            await self.command(facts.UncordonNode(name), o.node_command_id(name, ident[0], "uncordon", ident[1]))

