"""Snapshots: one cluster's view at a ledger sequence, so a follower replays only the tail.

Contract:
- A snapshot is one object, `view`, in the JetStream object store
  `subjects.object_bucket(cluster, "snapshots")` (file storage, `stream_replicas()` copies);
  each `save` replaces it. Only the admission leader writes it (`SnapshotWriter`); every
  follower, standby and rebuilding leader reads it (`SnapshotStore.load`).
- Its bytes: `MAGIC`, a 4-byte big-endian header length, a JSON header, then the zlib-compressed
  pickle of `(Cluster, command_ids, command_digests)` — the view as `Cluster.__getstate__`
  gives it (no journal, no facts) and which command committed at which sequence.
  The header: `format` (FORMAT), `code` (`code_fingerprint()`: the SHA-256 of the sources that
  define the view and how ledger entries apply to it), `cluster`, `config`
  (`config_digest`), `sequence` (the last ledger sequence the view holds), `ledger_digest`
  (SHA-256 of the ledger message stored at `sequence`), `written` (Unix seconds), `entries`
  and `leases` (for people).
- `load()` returns a `Snapshot` only when every check holds: the object exists and its
  object-store digest matches, the magic, format, code, cluster and config are this process's,
  the ledger still holds a message at `sequence` whose SHA-256 is `ledger_digest`, and the
  body unpickles to the expected types. Anything else returns None and says why in
  `last_refusal` — the caller replays the ledger from the start, so correctness never depends
  on a snapshot. Trust: a pickle is code; the bucket is written by the admission user only
  (NATS permissions, `bus.security` grant `write snapshots`), the same trust as the ledger.
- `SnapshotWriter.maybe(view, sequence, ids, digests)` is called by the leader whenever its
  view is exactly the ledger's up to `sequence`; once `every` ledger messages and `min_seconds`
  have passed since the last snapshot (and none is being written), it forks: the child pickles
  the view as it is at that instant and pipes the bytes back, the parent goes on deciding and
  uploads them when they arrive (without `os.fork` it pickles in line).
Not: the ledger (the truth; a snapshot is a cache of it), not a backup.
"""

from __future__ import annotations

import asyncio
import contextlib
import copyreg
import dataclasses
import gc
import hashlib
import importlib
import io
import json
import os
import pickle
import pkgutil
import time
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType

from jobtree.bus import subjects
from jobtree.bus.ledger import stream_replicas
from jobtree.core.engine import Cluster
from jobtree.core.model import ClusterConfig

__all__ = [
    "EVERY_ENV",
    "FORMAT",
    "MIN_SECONDS_ENV",
    "Snapshot",
    "SnapshotStore",
    "SnapshotWriter",
    "code_fingerprint",
    "config_digest",
    "decode",
    "encode",
    "settings_from_env",
]

MAGIC = b"JTSNAP\x00"
FORMAT = 1
OBJECT = "view"
READ_SECONDS = 5.0
READ_BYTES_PER_SECOND = 5 << 20
"""Reading a snapshot gives up after READ_SECONDS plus its size at this rate: the object store's
reader waits for every chunk without a deadline, and chunks purged by a newer snapshot written
meanwhile never come (the caller then replays the ledger instead)."""
EVERY_ENV = "JOBTREE_SNAPSHOT_EVERY"
"""Ledger messages between two snapshots (default EVERY; 0 turns the writer off)."""
MIN_SECONDS_ENV = "JOBTREE_SNAPSHOT_MIN_SECONDS"
"""Least seconds between two snapshots (default MIN_SECONDS)."""
EVERY = 1000
MIN_SECONDS = 30.0
_SOURCES = ("core", "api/convert.py", "bus/snapshot.py")
"""What defines a view and how entries apply to it: a change to any of them retires old snapshots."""


class SnapshotError(ValueError):
    """A snapshot that must not be used; `reason` says which check failed."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Snapshot:
    sequence: int
    """The last ledger sequence the view holds."""
    cluster: Cluster
    command_ids: dict[str, int]
    command_digests: dict[str, bytes]
    header: dict[str, Any]


@cache
def code_fingerprint() -> str:
    """SHA-256 over the sources in _SOURCES (relative to the jobtree package), in path order."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(f"format {FORMAT}\n".encode())
    for name in _SOURCES:
        base = root / name
        for path in sorted(base.rglob("*.py")) if base.is_dir() else [base]:
            h.update(str(path.relative_to(root)).encode() + b"\n" + path.read_bytes())
    return h.hexdigest()


def config_digest(config: ClusterConfig) -> str:
    return hashlib.sha256(repr(config).encode()).hexdigest()


def ledger_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _by_init(obj: Any) -> tuple[Any, tuple[Any, ...]]:
    """Pickle a frozen dataclass as a call of its class with its fields (its generated
    `__init__`): loading is about twice as fast as the dataclass `__setstate__`."""
    return type(obj), tuple([getattr(obj, name) for name in type(obj).__match_args__])


@cache
def _dispatch_table() -> dict[type, Any]:
    """The reducers of the core's frozen dataclasses whose fields are all `__init__` arguments."""
    import jobtree.core as core_pkg

    table: dict[type, Any] = dict(copyreg.dispatch_table)
    for info in pkgutil.iter_modules(core_pkg.__path__):
        module = importlib.import_module(f"jobtree.core.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and value.__module__ == module.__name__ and dataclasses.is_dataclass(value)
                    and value.__dataclass_params__.frozen  # type: ignore[attr-defined]
                    and all(f.init for f in dataclasses.fields(value))):
                table[value] = _by_init
    return table


def encode_body(cl: Cluster, command_ids: dict[str, int], command_digests: dict[str, bytes]) -> bytes:
    """The compressed pickle of a view and its command ids (what the writer's child computes)."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _dispatch_table()
    pickler.dump((cl, command_ids, command_digests))
    return zlib.compress(out.getbuffer(), 1)


def header_of(cluster_name: str, cl: Cluster, sequence: int) -> dict[str, Any]:
    """The header fields of a snapshot of `cl` at `sequence`, but its ledger digest."""
    return {"format": FORMAT, "code": code_fingerprint(), "cluster": cluster_name, "config": config_digest(cl.config),
            "sequence": sequence, "written": int(time.time()), "leases": len(cl.leases), "runs": len(cl.runs)}


def assemble(header: dict[str, Any], ledger_sha: str, body: bytes) -> bytes:
    raw = json.dumps({**header, "ledger_digest": ledger_sha, "body_bytes": len(body)}, sort_keys=True).encode()
    return MAGIC + len(raw).to_bytes(4, "big") + raw + body


def encode(cluster_name: str, cl: Cluster, sequence: int, command_ids: dict[str, int],
           command_digests: dict[str, bytes], ledger_sha: str) -> bytes:
    """The snapshot bytes of a view that holds the ledger up to `sequence`, whose message there
    has SHA-256 `ledger_sha`."""
    return assemble(header_of(cluster_name, cl, sequence), ledger_sha, encode_body(cl, command_ids, command_digests))


def read_header(blob: bytes) -> tuple[dict[str, Any], int]:
    """The header of snapshot bytes and where the body starts (SnapshotError if malformed)."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise SnapshotError("not a jobtree snapshot (bad magic)")
    at = len(MAGIC) + 4
    size = int.from_bytes(blob[len(MAGIC):at], "big")
    try:
        header = json.loads(blob[at:at + size])
    except ValueError:
        raise SnapshotError("the header is not JSON") from None
    if not isinstance(header, dict):
        raise SnapshotError("the header is not a JSON object")
    return header, at + size


def check_header(header: dict[str, Any], cluster_name: str, config: ClusterConfig) -> int:
    """The snapshot's sequence if it was written by this code for this cluster and config."""
    if header.get("format") != FORMAT:
        raise SnapshotError(f"format {header.get('format')!r}, this code reads {FORMAT}")
    if header.get("code") != code_fingerprint():
        raise SnapshotError("written by another version of the core")
    if header.get("cluster") != cluster_name:
        raise SnapshotError(f"of cluster {header.get('cluster')!r}, not {cluster_name!r}")
    if header.get("config") != config_digest(config):
        raise SnapshotError("the cluster config changed since it was written")
    seq = header.get("sequence")
    if not isinstance(seq, int) or seq < 1 or not isinstance(header.get("ledger_digest"), str):
        raise SnapshotError(f"no valid sequence and ledger digest (sequence {seq!r})")
    return seq


def decode(blob: bytes, cluster_name: str, config: ClusterConfig) -> Snapshot:
    """The snapshot in `blob` (SnapshotError naming the failed check). The ledger check is the
    caller's: the header's `ledger_digest` against the message at `sequence`."""
    header, body_at = read_header(blob)
    seq = check_header(header, cluster_name, config)
    collecting = gc.isenabled()
    gc.disable()  # millions of new objects, none garbage: collections would only rescan them
    try:
        cl, ids, digests = pickle.loads(zlib.decompress(blob[body_at:]))
    except Exception as exc:  # a truncated or corrupt body: any unpickling error
        raise SnapshotError(f"the body does not load ({type(exc).__name__})") from None
    finally:
        if collecting:
            gc.enable()
    if not isinstance(cl, Cluster) or not isinstance(ids, dict) or not isinstance(digests, dict):
        raise SnapshotError("the body is not a view")
    return Snapshot(seq, cl, ids, digests, header)


class SnapshotStore:
    """The snapshot bucket of one cluster."""

    def __init__(self, js: JetStreamContext, cluster: str, config: ClusterConfig) -> None:
        self.js = js
        self.cluster = subjects.check_cluster(cluster)
        self.config = config
        self.bucket = subjects.object_bucket(cluster, "snapshots")
        self.last_refusal = ""
        """Why the last `load` returned None ("" after a load that returned a snapshot)."""

    async def _store(self, create: bool) -> Any:
        try:
            return await self.js.object_store(self.bucket)
        except nats.js.errors.NotFoundError:
            if not create:
                raise
            return await self.js.create_object_store(self.bucket, ObjectStoreConfig(
                description=f"jobtree view snapshots of cluster {self.cluster}", storage=StorageType.FILE,
                replicas=stream_replicas()))

    async def ledger_digest_at(self, sequence: int) -> str:
        msg = await self.js.get_msg(subjects.ledger_stream(self.cluster), seq=sequence)
        return ledger_digest(msg.data or b"")

    async def save(self, blob: bytes) -> None:
        """Store snapshot bytes as the newest snapshot."""
        store = await self._store(create=True)
        await store.put(OBJECT, blob)

    async def read(self) -> bytes | None:
        """The stored snapshot bytes (None when there is none)."""
        try:
            store = await self._store(create=False)
            info = await store.get_info(OBJECT)
            out = io.BytesIO()
            await asyncio.wait_for(store.get(OBJECT, writeinto=out),
                                   READ_SECONDS + (info.size or 0) / READ_BYTES_PER_SECOND)
        except nats.js.errors.NotFoundError:
            return None
        return out.getvalue()

    async def load(self) -> Snapshot | None:
        """The newest snapshot if every check holds (see the module contract), else None."""
        self.last_refusal = ""
        try:
            blob = await self.read()
        except nats.js.errors.DigestMismatchError:
            self.last_refusal = "its bytes do not match the object store's digest"
            return None
        except TimeoutError:
            self.last_refusal = "reading it did not finish in time (replaced while it was read?)"
            return None
        if blob is None:
            self.last_refusal = "there is no snapshot"
            return None
        try:
            header, _ = read_header(blob)
            seq = check_header(header, self.cluster, self.config)
            try:
                found = await self.ledger_digest_at(seq)
            except nats.js.errors.NotFoundError:
                raise SnapshotError(f"the ledger holds no message at its sequence {seq}") from None
            if found != header["ledger_digest"]:
                raise SnapshotError(f"the ledger message at its sequence {seq} is not the one it was taken after")
            # on a thread: unpickling a large view takes seconds, and the event loop must go on
            # (the admission leader refreshes its lock on it)
            return await asyncio.to_thread(decode, blob, self.cluster, self.config)
        except SnapshotError as exc:
            self.last_refusal = exc.reason
            return None


def settings_from_env() -> tuple[int, float]:
    """(every, min_seconds) from $JOBTREE_SNAPSHOT_EVERY and $JOBTREE_SNAPSHOT_MIN_SECONDS
    (ValueError naming the variable, what it got and what it may be)."""
    raw_every = os.environ.get(EVERY_ENV, "").strip() or str(EVERY)
    raw_min = os.environ.get(MIN_SECONDS_ENV, "").strip() or str(MIN_SECONDS)
    if not raw_every.isdigit():
        raise ValueError(f"{EVERY_ENV} must be a whole number of ledger messages (0 turns snapshots off), "
                         f"got {raw_every!r}")
    try:
        min_seconds = float(raw_min)
    except ValueError:
        min_seconds = -1.0
    if not 0 <= min_seconds < float("inf"):
        raise ValueError(f"{MIN_SECONDS_ENV} must be a number of seconds >= 0, got {raw_min!r}")
    return int(raw_every), min_seconds


class SnapshotWriter:
    """The leader's periodic snapshots (see the module contract)."""

    def __init__(self, store: SnapshotStore, log: Any, *, every: int | None = None,
                 min_seconds: float | None = None) -> None:
        self.store = store
        self.log = log
        env_every, env_min = settings_from_env() if every is None or min_seconds is None else (0, 0.0)
        self.every = env_every if every is None else every
        self.min_seconds = env_min if min_seconds is None else min_seconds
        self.last_sequence = 0
        self.last_time = -float("inf")
        self.task: asyncio.Task[None] | None = None
        self.written = 0
        self.failed = 0

    def due(self, sequence: int) -> bool:
        return (self.every > 0 and self.task is None and sequence - self.last_sequence >= self.every
                and time.monotonic() - self.last_time >= self.min_seconds)

    def maybe(self, cl: Cluster, sequence: int, ids: dict[str, int], digests: dict[str, bytes]) -> bool:
        """Start a snapshot of `cl` (which holds the ledger up to `sequence`) if one is due."""
        if not self.due(sequence):
            return False
        self.last_sequence, self.last_time = sequence, time.monotonic()
        started = time.perf_counter()
        header = header_of(self.store.cluster, cl, sequence)
        body = _body_in_child(cl, ids, digests)
        self.task = asyncio.ensure_future(self._finish(header, body, started))
        return True

    async def _finish(self, header: dict[str, Any], body: Any, started: float) -> None:
        sequence = header["sequence"]
        try:
            digest = await self.store.ledger_digest_at(sequence)
            blob = assemble(header, digest, await body())
            await self.store.save(blob)
            self.written += 1
            self.log.info("snapshot written", extra={"fields": {
                "sequence": sequence, "bytes": len(blob), "seconds": round(time.perf_counter() - started, 3)}})
        except Exception as exc:  # a snapshot is a cache: failing to write one must not stop the leader
            self.failed += 1
            self.log.warning("snapshot not written", extra={"fields": {"sequence": sequence, "error": repr(exc)}})
        finally:
            self.task = None

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


def _body_in_child(cl: Cluster, ids: dict[str, int], digests: dict[str, bytes]) -> Any:
    """Freeze the view now: fork a child that pickles it and pipes the bytes back, so the
    parent goes on deciding meanwhile. Returns a coroutine function giving the bytes. Without
    `os.fork`, pickles in line."""
    if not hasattr(os, "fork"):
        body = encode_body(cl, ids, digests)

        async def inline() -> bytes:
            return body
        return inline
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: pickle, write, exit without running any of the parent's cleanup
        code = 1
        try:
            os.close(read_fd)
            with os.fdopen(write_fd, "wb") as out:
                out.write(encode_body(cl, ids, digests))
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)

    def collect() -> bytes:
        with os.fdopen(read_fd, "rb") as src:
            body = src.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SnapshotError(f"the snapshot child exited with {os.waitstatus_to_exitcode(status)}")
        return body

    async def forked() -> bytes:
        return await asyncio.get_running_loop().run_in_executor(None, collect)
    return forked
