"""jobtree.core — the scheduling calculus (CALCULUS.md), pure.

Contract: no I/O, no asyncio/NATS/gRPC/Kubernetes, no clock reads, no global state. Every
decision is a function of a state snapshot and an instant supplied by the caller, and returns
facts (leases to mint and close, reservations, run status) that the caller applies.
Not: a scheduler loop, a store, or a transport — those live in the shells (sim, services).
"""
