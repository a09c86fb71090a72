"""Typed refusals: every kind of the core's errors has one bus code and one gRPC status, and the
owner a namespace's Run may spend for is the core's rule (`family.owner_claim`, Forbidden)."""

from __future__ import annotations

import grpc
import pytest

from jobtree.api import convert
from jobtree.core import errors
from jobtree.core.errors import Forbidden, NotFound, Precondition, ValidationError
from jobtree.core.family import Family, owner_claim
from jobtree.core.manifest import parse_budget
from jobtree.services.gateway.base import STATUS_OF, _invalid

KINDS = {ValidationError: grpc.StatusCode.INVALID_ARGUMENT, NotFound: grpc.StatusCode.NOT_FOUND,
         Precondition: grpc.StatusCode.FAILED_PRECONDITION, Forbidden: grpc.StatusCode.PERMISSION_DENIED}


def test_every_kind_maps_once_to_a_bus_code_and_a_grpc_status() -> None:
    kinds = {cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, ValidationError)}
    assert kinds == set(KINDS), "a new kind of refusal needs its code"
    for cls, status in KINDS.items():
        err = cls("spec.owner", "no")
        assert STATUS_OF[convert.ERROR_CODE_OF_KIND[err.kind]] == status
        proto = convert.error_to_proto(err)
        assert (proto.field_path, proto.problem) == ("spec.owner", "no")
        assert _invalid(err).code == status and _invalid(err).message == "spec.owner: no"
        assert type(err.under("run")) is cls  # a prefixed path keeps the kind


def _family() -> Family:
    def budget(name: str, owner: str, parents: list[str]) -> object:
        return parse_budget({"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget", "metadata": {"name": name},
                             "spec": {"owner": owner, "parents": parents, "envelopes": []}}, "b")

    return Family([budget("ml", "org:ml", []), budget("vision", "org:ml:vision", ["org:ml"]),  # type: ignore[list-item]
                   budget("deep", "org:ml:vision:deep", ["org:ml:vision"])])  # type: ignore[list-item]


@pytest.mark.parametrize(("bound", "claimed", "owner"), [
    (["org:ml:vision"], None, "org:ml:vision"),  # the one bound owner
    (["org:ml:vision"], "org:ml:vision", "org:ml:vision"),
    (["org:ml:vision"], "org:ml:vision:deep", "org:ml:vision:deep"),  # a descendant, by the budgets
    (["org:a", "org:ml"], "org:ml:vision:deep", "org:ml:vision:deep"),
])
def test_a_run_may_spend_for_its_namespace_owners_and_their_descendants(
        bound: list[str], claimed: str | None, owner: str) -> None:
    assert owner_claim("vision", bound, claimed, _family()) == owner


@pytest.mark.parametrize(("bound", "claimed", "path", "problem"), [
    ([], "org:ml", "", "namespace vision is not bound to an owner"),
    (["org:a", "org:b"], None, "spec.owner", "required: namespace vision is shared by org:a, org:b; name one of them"),
    (["org:ml:vision"], "org:ml", "spec.owner", "'org:ml' is neither 'org:ml:vision' (the owner of namespace vision) "
                                                "nor a descendant"),  # an ancestor is not a descendant
    (["org:ml:vision"], "org:ml:visionary", "spec.owner", "'org:ml:visionary' is neither"),
])
def test_any_other_owner_is_forbidden(bound: list[str], claimed: str | None, path: str, problem: str) -> None:
    with pytest.raises(Forbidden) as info:
        owner_claim("vision", bound, claimed, _family())
    assert info.value.kind == "forbidden" and info.value.path == path and problem in info.value.problem
