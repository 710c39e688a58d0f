"""AccessControl over in-memory fakes: datasets, grants with expiry, decisions, audit."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from services.access.core import STEWARD_TERM, AccessControl
from services.shared.adapters.memory import InMemoryBus, InMemoryDocumentStore
from services.shared.auth import ROLE_ADMIN, ROLE_SERVICE, Principal
from services.shared.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from services.shared.events import ALL_TOPICS, TOPIC_AUDIT, TOPIC_DATASET_CREATED, EventEmitter
from services.shared.outbox import Outbox
from services.shared.ports.bus import Publisher
from services.shared.ports.documents import Collection
from tessera.access.v1.access_pb2 import Action, Role
from tessera.events.v1 import events_pb2

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
ADMIN = Principal("root", frozenset({ROLE_ADMIN}))
SERVICE = Principal("svc-metadata", frozenset({ROLE_SERVICE}))
ALICE = Principal("alice")  # becomes data steward of ds-1 (granted by the admin)
BOB = Principal("bob")
CAROL = Principal("carol")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class SwitchablePublisher(Publisher):
    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self.down = False

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        if self.down:
            raise ConnectionError("broker down")
        await self.inner.publish(topic, value, key=key, headers=headers)


@dataclass
class World:
    ac: AccessControl
    clock: Clock
    bus: InMemoryBus
    publisher: SwitchablePublisher
    audit: Collection
    grants: Collection
    outbox_col: Collection
    outbox: Outbox

    def events(self, topic: str) -> list[events_pb2.EventEnvelope]:
        return [events_pb2.EventEnvelope.FromString(m.value) for m in self.bus.messages(topic)]


@pytest.fixture
async def w() -> AsyncIterator[World]:
    docs = InMemoryDocumentStore()
    bus = InMemoryBus()
    await bus.ensure_topics(list(ALL_TOPICS))
    publisher = SwitchablePublisher(bus.publisher())
    await publisher.start()
    clock = Clock(T0)
    outbox_col = docs.collection("access_outbox")
    outbox = Outbox(outbox_col, EventEmitter("access", publisher))
    ac = AccessControl(
        datasets=docs.collection("datasets"),
        grants=docs.collection("grants"),
        audit=docs.collection("audit"),
        outbox=outbox,
        clock=clock,
    )
    await ac.ensure_indexes()
    yield World(
        ac,
        clock,
        bus,
        publisher,
        docs.collection("audit"),
        docs.collection("grants"),
        outbox_col,
        outbox,
    )
    await publisher.stop()


async def with_dataset(w: World, dataset_id: str = "ds-1") -> None:
    await w.ac.create_dataset(ADMIN, dataset_id, "Dataset one", "for tests")
    await w.ac.grant(
        ADMIN, dataset_id, "alice", Role.ROLE_DATA_STEWARD, "stewardship", T0 + timedelta(days=30)
    )


# -- datasets -----------------------------------------------------------------------------


async def test_only_admins_create_datasets(w: World) -> None:
    for caller in (ALICE, SERVICE):
        with pytest.raises(PermissionDenied) as err:
            await w.ac.create_dataset(caller, "ds-1", "x", "")
        assert err.value.reason == "NOT_ADMIN"
    with pytest.raises(NotFound):
        await w.ac.get_dataset(ADMIN, "ds-1")


@pytest.mark.parametrize(
    "dataset_id",
    [
        "",
        "ab",
        "A-upper",
        "-lead",
        "trail-",
        "under_score",
        "sp ace",
        "x" * 64,
        "ds/1",
        "ds.1",
        "ds-1\n",  # `$` alone would let a trailing newline through
    ],
)
async def test_invalid_dataset_ids_are_rejected(w: World, dataset_id: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        await w.ac.create_dataset(ADMIN, dataset_id, "x", "")
    assert err.value.reason == "BAD_DATASET_ID"


async def test_long_name_or_description_rejected(w: World) -> None:
    with pytest.raises(InvalidArgument):
        await w.ac.create_dataset(ADMIN, "ds-1", "n" * 201, "")
    with pytest.raises(InvalidArgument):
        await w.ac.create_dataset(ADMIN, "ds-1", "", "d" * 2001)


async def test_create_dataset_makes_creator_steward_and_announces_it(w: World) -> None:
    ds = await w.ac.create_dataset(ADMIN, "abc", "", "desc")
    assert (ds.dataset_id, ds.name, ds.description, ds.created_by) == ("abc", "abc", "desc", "root")
    assert ds.created_at == T0

    [grant] = await w.ac.list_grants(ADMIN, "abc", "")
    assert grant.subject == "root"
    assert grant.role == Role.ROLE_DATA_STEWARD
    assert grant.expires_at == T0 + STEWARD_TERM
    # the creator's grant is a real one: it holds without the admin role
    decision = await w.ac.check(SERVICE, "root", Action.ACTION_MANAGE, "abc", "dataset/abc")
    assert (decision.allowed, decision.reason) == (True, "GRANTED")

    [env] = w.events(TOPIC_DATASET_CREATED)
    assert env.dataset_id == "abc"
    assert env.dataset_created.name == "abc"
    assert env.dataset_created.description == "desc"

    with pytest.raises(AlreadyExists):
        await w.ac.create_dataset(ADMIN, "abc", "again", "")
    assert len(w.events(TOPIC_DATASET_CREATED)) == 1


async def test_get_dataset_needs_a_grant(w: World) -> None:
    await with_dataset(w)
    assert (await w.ac.get_dataset(ALICE, "ds-1")).name == "Dataset one"
    assert (await w.ac.get_dataset(SERVICE, "ds-1")).dataset_id == "ds-1"
    with pytest.raises(PermissionDenied) as err:
        await w.ac.get_dataset(BOB, "ds-1")
    assert err.value.reason == "NO_GRANT"


# -- grants -------------------------------------------------------------------------------


async def test_grant_requires_future_expiry(w: World) -> None:
    await with_dataset(w)
    for expiry, reason in (
        (None, "EXPIRY_REQUIRED"),
        (T0 - timedelta(seconds=1), "EXPIRY_IN_PAST"),
        (T0, "EXPIRY_IN_PAST"),
        # a naive datetime is taken as UTC, so this is in the past too
        ((T0 - timedelta(hours=1)).replace(tzinfo=None), "EXPIRY_IN_PAST"),
    ):
        with pytest.raises(InvalidArgument) as err:
            await w.ac.grant(ALICE, "ds-1", "bob", Role.ROLE_RESEARCHER, "study", expiry)
        assert err.value.reason == reason
    g = await w.ac.grant(
        ALICE, "ds-1", "bob", Role.ROLE_RESEARCHER, "study", T0 + timedelta(days=1)
    )
    assert g.expires_at == T0 + timedelta(days=1)
    assert (g.granted_by, g.granted_at, g.purpose) == ("alice", T0, "study")


@pytest.mark.parametrize("role", [Role.ROLE_UNSPECIFIED, 99, -1])
async def test_grant_requires_valid_role(w: World, role: int) -> None:
    await with_dataset(w)
    with pytest.raises(InvalidArgument) as err:
        await w.ac.grant(ALICE, "ds-1", "bob", role, "", T0 + timedelta(days=1))
    assert err.value.reason == "BAD_ROLE"


@pytest.mark.parametrize("subject", ["", " bob", "bob smith", "x" * 129, "-bob", "bob\n"])
async def test_grant_requires_valid_subject(w: World, subject: str) -> None:
    await with_dataset(w)
    with pytest.raises(InvalidArgument) as err:
        await w.ac.grant(ALICE, "ds-1", subject, Role.ROLE_RESEARCHER, "", T0 + timedelta(days=1))
    assert err.value.reason == "BAD_SUBJECT"


async def test_grant_requires_manage_permission(w: World) -> None:
    await with_dataset(w)
    later = T0 + timedelta(days=1)
    await w.ac.grant(ALICE, "ds-1", "bob", Role.ROLE_RESEARCHER, "", later)
    for caller in (BOB, CAROL):  # a researcher, and someone with no grant at all
        with pytest.raises(PermissionDenied):
            await w.ac.grant(caller, "ds-1", "carol", Role.ROLE_RESEARCHER, "", later)
    with pytest.raises(NotFound):
        await w.ac.grant(ALICE, "ds-nope", "bob", Role.ROLE_RESEARCHER, "", later)
    # nothing was granted to carol
    decision = await w.ac.check(SERVICE, "carol", Action.ACTION_READ_RECORD, "ds-1", "r")
    assert decision.reason == "NO_GRANT"


async def test_steward_with_expired_grant_can_no_longer_manage(w: World) -> None:
    await with_dataset(w)
    w.clock.advance(timedelta(days=31))
    with pytest.raises(PermissionDenied) as err:
        await w.ac.grant(
            ALICE, "ds-1", "bob", Role.ROLE_RESEARCHER, "", w.clock.now + timedelta(days=1)
        )
    assert err.value.reason == "GRANT_EXPIRED"


# -- decisions ----------------------------------------------------------------------------


async def test_check_outcomes(w: World) -> None:
    await with_dataset(w)
    soon = T0 + timedelta(hours=1)
    await w.ac.grant(ALICE, "ds-1", "bob", Role.ROLE_RESEARCHER, "study", soon)
    await w.ac.grant(ALICE, "ds-1", "carol", Role.ROLE_OPERATOR, "", T0 + timedelta(days=9))

    async def reason(subject: str, action: int, dataset: str = "ds-1") -> tuple[bool, str]:
        d = await w.ac.check(SERVICE, subject, action, dataset, f"dataset/{dataset}")
        return d.allowed, d.reason

    assert await reason("bob", Action.ACTION_READ_PIXELS) == (True, "GRANTED")
    assert await reason("dave", Action.ACTION_READ_PIXELS) == (False, "NO_GRANT")
    assert await reason("bob", Action.ACTION_READ_PIXELS, "ds-zzz") == (False, "DATASET_NOT_FOUND")
    assert await reason("bob", Action.ACTION_MANAGE) == (False, "ROLE_LACKS_ACTION")
    assert await reason("carol", Action.ACTION_READ_RECORD) == (True, "GRANTED")
    assert await reason("carol", Action.ACTION_READ_PIXELS) == (False, "ROLE_LACKS_ACTION")

    w.clock.advance(timedelta(hours=1))  # bob's grant ends exactly now
    assert await reason("bob", Action.ACTION_READ_PIXELS) == (False, "GRANT_EXPIRED")
    assert await reason("carol", Action.ACTION_READ_RECORD) == (True, "GRANTED")


async def test_expired_grant_does_not_hide_a_live_one(w: World) -> None:
    await with_dataset(w)
    await w.ac.grant(ALICE, "ds-1", "bob", Role.ROLE_RESEARCHER, "", T0 + timedelta(hours=1))
    await w.ac.grant(ALICE, "ds-1", "bob", Role.ROLE_AI_DEVELOPER, "", T0 + timedelta(days=5))
    w.clock.advance(timedelta(days=1))
    d = await w.ac.check(SERVICE, "bob", Action.ACTION_INFER, "ds-1", "r")
    assert (d.allowed, d.reason) == (True, "GRANTED")


async def test_each_check_is_audited_in_store_and_on_the_bus(w: World) -> None:
    await with_dataset(w)
    before = len(w.events(TOPIC_AUDIT))
    d = await w.ac.check(
        SERVICE, "bob", Action.ACTION_READ_PIXELS, "ds-1", "slide/s1/tile/0/0_0", "study-7"
    )
    rec = await w.audit.get(d.decision_id)
    assert rec is not None
    assert rec["subject"] == "bob"
    assert rec["action"] == Action.ACTION_READ_PIXELS
    assert rec["dataset_id"] == "ds-1"
    assert rec["resource"] == "slide/s1/tile/0/0_0"
    assert rec["allowed"] is False
    assert rec["reason"] == "NO_GRANT"
    assert rec["requester"] == "svc-metadata"
    assert rec["purpose"] == "study-7"
    assert rec["at"] == T0

    # the decision did not wait on the bus: the event is queued and sent by the flush
    assert len(w.events(TOPIC_AUDIT)) == before
    await w.outbox.flush()
    events = w.events(TOPIC_AUDIT)
    assert len(events) == before + 1
    env = events[-1]
    assert env.event_id == d.decision_id
    assert env.dataset_id == "ds-1"
    p = env.access_decided
    assert (p.decision_id, p.subject, p.action, p.allowed, p.reason) == (
        d.decision_id,
        "bob",
        "ACTION_READ_PIXELS",
        False,
        "NO_GRANT",
    )
    assert p.resource == "slide/s1/tile/0/0_0"

    records = await w.ac.list_audit(ADMIN, "bob", "", "", 10)
    assert [r.decision_id for r in records] == [d.decision_id]


async def test_audit_event_survives_a_bus_outage(w: World) -> None:
    await with_dataset(w)
    w.publisher.down = True
    d = await w.ac.check(SERVICE, "bob", Action.ACTION_READ_RECORD, "ds-1", "r")
    assert not d.allowed  # the decision is still made and recorded
    assert await w.audit.get(d.decision_id) is not None
    assert d.decision_id not in [e.event_id for e in w.events(TOPIC_AUDIT)]
    w.publisher.down = False
    assert await w.outbox.flush() >= 1
    assert d.decision_id in [e.event_id for e in w.events(TOPIC_AUDIT)]


async def test_non_service_caller_may_only_check_itself(w: World) -> None:
    await with_dataset(w)
    await w.ac.grant(ALICE, "ds-1", "bob", Role.ROLE_RESEARCHER, "", T0 + timedelta(days=1))
    with pytest.raises(PermissionDenied) as err:
        await w.ac.check(CAROL, "bob", Action.ACTION_READ_RECORD, "ds-1", "r")
    assert err.value.reason == "NOT_SERVICE"
    own = await w.ac.check(BOB, "bob", Action.ACTION_READ_RECORD, "ds-1", "r")
    assert own.allowed
    assert (await w.ac.check(ADMIN, "bob", Action.ACTION_READ_RECORD, "ds-1", "r")).allowed
    with pytest.raises(PermissionDenied):
        await w.ac.permitted_datasets(CAROL, "bob", Action.ACTION_READ_RECORD)


@pytest.mark.parametrize(
    ("action", "dataset_id", "subject", "reason"),
    [
        (Action.ACTION_UNSPECIFIED, "ds-1", "bob", "BAD_ACTION"),
        (77, "ds-1", "bob", "BAD_ACTION"),
        (Action.ACTION_READ_RECORD, "", "bob", "MISSING_FIELD"),
        (Action.ACTION_READ_RECORD, "ds-1", "", "MISSING_FIELD"),
    ],
)
async def test_check_validates_its_arguments(
    w: World, action: int, dataset_id: str, subject: str, reason: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        await w.ac.check(SERVICE, subject, action, dataset_id, "r")
    assert err.value.reason == reason
    assert await w.audit.count({}) == 0


async def test_permitted_datasets(w: World) -> None:
    for ds in ("ds-a", "ds-b", "ds-c", "ds-d"):
        await with_dataset(w, ds)
    await w.ac.grant(ALICE, "ds-a", "bob", Role.ROLE_RESEARCHER, "", T0 + timedelta(days=2))
    await w.ac.grant(ALICE, "ds-b", "bob", Role.ROLE_OPERATOR, "", T0 + timedelta(days=2))
    await w.ac.grant(ALICE, "ds-c", "bob", Role.ROLE_RESEARCHER, "", T0 + timedelta(hours=1))

    assert await w.ac.permitted_datasets(SERVICE, "bob", Action.ACTION_READ_RECORD) == [
        "ds-a",
        "ds-b",
        "ds-c",
    ]
    assert await w.ac.permitted_datasets(BOB, "bob", Action.ACTION_READ_PIXELS) == [
        "ds-a",
        "ds-c",
    ]
    w.clock.advance(timedelta(hours=2))
    assert await w.ac.permitted_datasets(SERVICE, "bob", Action.ACTION_READ_PIXELS) == ["ds-a"]
    assert await w.ac.permitted_datasets(SERVICE, "nobody", Action.ACTION_READ_RECORD) == []
    # listing is audited too
    assert await w.audit.count({"subject": "bob", "dataset_id": "*"}) == 3


async def test_revoke(w: World) -> None:
    await with_dataset(w)
    later = T0 + timedelta(days=1)
    await w.ac.grant(ALICE, "ds-1", "bob", Role.ROLE_RESEARCHER, "", later)
    await w.ac.grant(ALICE, "ds-1", "bob", Role.ROLE_AI_DEVELOPER, "", later)

    with pytest.raises(PermissionDenied):
        await w.ac.revoke(BOB, "ds-1", "bob", 0)
    with pytest.raises(NotFound):
        await w.ac.revoke(ALICE, "ds-nope", "bob", 0)

    assert await w.ac.revoke(ALICE, "ds-1", "bob", Role.ROLE_AI_DEVELOPER) == 1
    d = await w.ac.check(SERVICE, "bob", Action.ACTION_INFER, "ds-1", "r")
    assert d.reason == "ROLE_LACKS_ACTION"
    assert (await w.ac.check(SERVICE, "bob", Action.ACTION_READ_PIXELS, "ds-1", "r")).allowed

    assert await w.ac.revoke(ALICE, "ds-1", "bob", Role.ROLE_UNSPECIFIED) == 1  # all roles
    d = await w.ac.check(SERVICE, "bob", Action.ACTION_READ_PIXELS, "ds-1", "r")
    assert d.reason == "NO_GRANT"
    assert await w.ac.revoke(ALICE, "ds-1", "bob", 0) == 0
    # alice's own stewardship is untouched
    assert (await w.ac.check(ALICE, "alice", Action.ACTION_MANAGE, "ds-1", "r")).allowed


async def test_list_grants_permissions(w: World) -> None:
    await with_dataset(w)
    await w.ac.grant(ALICE, "ds-1", "bob", Role.ROLE_RESEARCHER, "", T0 + timedelta(days=1))
    own = await w.ac.list_grants(BOB, "", "bob")
    assert [(g.dataset_id, g.role) for g in own] == [("ds-1", Role.ROLE_RESEARCHER)]
    with pytest.raises(PermissionDenied):
        await w.ac.list_grants(BOB, "", "alice")
    with pytest.raises(PermissionDenied):
        await w.ac.list_grants(BOB, "ds-1", "")
    subjects = {g.subject for g in await w.ac.list_grants(ALICE, "ds-1", "")}
    assert subjects == {"root", "alice", "bob"}


async def test_list_audit_permissions(w: World) -> None:
    await with_dataset(w)
    await w.ac.check(SERVICE, "bob", Action.ACTION_READ_RECORD, "ds-1", "r")
    with pytest.raises(PermissionDenied):
        await w.ac.list_audit(BOB, "", "", "", 10)
    with pytest.raises(PermissionDenied):
        await w.ac.list_audit(BOB, "", "ds-1", "", 10)
    records = await w.ac.list_audit(ALICE, "bob", "ds-1", "", 10)
    # the service's check, and bob's own refused attempt to manage the dataset
    assert sorted((r.requester, r.action, r.reason) for r in records) == [
        ("bob", Action.ACTION_MANAGE, "NO_GRANT"),
        ("svc-metadata", Action.ACTION_READ_RECORD, "NO_GRANT"),
    ]


async def test_grant_term_is_bounded(w: World) -> None:
    await with_dataset(w)
    with pytest.raises(InvalidArgument) as err:
        await w.ac.grant(
            ADMIN, "ds-1", "dan", Role.ROLE_RESEARCHER, "study", T0 + timedelta(days=100_000)
        )
    assert err.value.reason == "EXPIRY_TOO_FAR"
