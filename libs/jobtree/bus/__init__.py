"""NATS and JetStream plumbing shared by every service.

Contract: `subjects` builds every subject, stream and bucket name (nothing else does);
`codec` encodes and decodes protobuf payloads with a type check; `ledger` appends facts to a
cluster's ledger stream with expected-last-sequence and message-id de-duplication, and
replays it; `natsserver` runs a real nats-server with JetStream (embedded default, tests).
Not: scheduling logic (jobtree.core), not the simulator or the CLI (import contract).
"""
