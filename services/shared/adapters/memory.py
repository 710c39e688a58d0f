"""In-memory fakes of the three ports, with the same semantics as the real adapters.

They back unit tests and single-process runs. Each fake is run through the same contract
suite as its real adapter (tests/contract), so behaviour a service relies on is the same in
both. All of them are single-event-loop objects: no locks, no threads (except the file I/O of
`InMemoryObjectStore.put_file`/`download_file`, which goes through `asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as _dt
import functools
import hashlib
import itertools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.partitioner import murmur2

from services.shared.ports.bus import Message, MessageBus, Publisher, Subscription
from services.shared.ports.documents import (
    Collection,
    Document,
    DocumentStore,
    DuplicateKey,
    Filter,
)
from services.shared.ports.objects import ObjectInfo, ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

__all__ = ["InMemoryBus", "InMemoryDocumentStore", "InMemoryObjectStore", "UnknownTopic"]


# ---------------------------------------------------------------------------------------------
# Message bus
# ---------------------------------------------------------------------------------------------


class UnknownTopic(LookupError):
    """Publishing to a topic that `ensure_topics` never created (auto-creation is off)."""


TopicPartition = tuple[str, int]


class _Group:
    def __init__(self) -> None:
        self.committed: dict[TopicPartition, int] = {}  # next offset to read
        self.members: list[_MemorySubscription] = []
        self.layout: tuple[Any, ...] | None = None  # what the current assignment was built from
        self.serials = itertools.count()


class InMemoryBus(MessageBus):
    """Partitioned topics, consumer groups with committed offsets, at-least-once redelivery.

    Like Kafka: a keyed message goes to the partition Kafka's default partitioner picks
    (murmur2 of the key; keyless ones round-robin); the partitions of the topics a group
    subscribes to are spread over the group's live subscriptions; every change of membership
    (or of the partition layout) is a rebalance, after which every member resumes each of its
    partitions from the group's committed offset, so fetched-but-uncommitted messages are
    delivered again.
    """

    def __init__(self, *, auto_create_topics: bool = False, default_partitions: int = 1) -> None:
        self._topics: dict[str, list[list[Message]]] = {}
        self._groups: dict[str, _Group] = {}
        self._auto_create = auto_create_topics
        self._default_partitions = default_partitions
        self._round_robin: dict[str, Iterator[int]] = {}
        self._data_event: asyncio.Event | None = None

    # -- port --------------------------------------------------------------------------------

    def publisher(self) -> Publisher:
        return _MemoryPublisher(self)

    def subscription(self, group: str, topics: Sequence[str]) -> Subscription:
        if isinstance(topics, str):
            raise TypeError("topics must be a sequence of topic names, not a str")
        return _MemorySubscription(self, group, tuple(topics))

    async def ensure_topics(self, topics: Sequence[str], partitions: int = 1) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        for topic in topics:
            self._create_topic(topic, partitions)

    # -- test helpers ------------------------------------------------------------------------

    async def backlog(self, group: str, topics: Sequence[str]) -> int:
        total = 0
        for topic in topics:
            for partition, messages in enumerate(self._topics.get(topic, ())):
                total += max(0, len(messages) - self.committed(group, topic, partition))
        return total

    def partitions(self, topic: str) -> int:
        """Number of partitions of `topic` (0 when it does not exist)."""
        return len(self._topics.get(topic, ()))

    def messages(self, topic: str) -> list[Message]:
        """Everything ever published to `topic`, partition by partition."""
        return [m for part in self._topics.get(topic, ()) for m in part]

    def committed(self, group: str, topic: str, partition: int = 0) -> int:
        """The group's committed (next-to-read) offset for a partition; 0 when none."""
        grp = self._groups.get(group)
        return grp.committed.get((topic, partition), 0) if grp else 0

    # -- internals ---------------------------------------------------------------------------

    def _create_topic(self, topic: str, partitions: int) -> None:
        if not topic:
            raise ValueError("empty topic name")
        if topic not in self._topics:
            self._topics[topic] = [[] for _ in range(partitions)]
            self._round_robin[topic] = itertools.cycle(range(partitions))
            self._notify()

    def _append(
        self, topic: str, value: bytes, key: bytes | None, headers: tuple[tuple[str, bytes], ...]
    ) -> None:
        if topic not in self._topics:
            if not self._auto_create:
                raise UnknownTopic(f"topic {topic!r} does not exist (call ensure_topics first)")
            self._create_topic(topic, self._default_partitions)
        parts = self._topics[topic]
        if key is None:
            p = next(self._round_robin[topic])
        else:
            # the Java client's (and aiokafka's) default: murmur2 of the key
            p = (murmur2(key) & 0x7FFFFFFF) % len(parts)
        log_ = parts[p]
        log_.append(Message(topic, p, len(log_), key, value, headers))
        self._notify()

    def _notify(self) -> None:
        if self._data_event is not None:
            self._data_event.set()
            self._data_event = None

    def _wait_event(self) -> asyncio.Event:
        if self._data_event is None:
            self._data_event = asyncio.Event()
        return self._data_event

    def _group(self, name: str) -> _Group:
        return self._groups.setdefault(name, _Group())

    def _rebalance_if_needed(self, group: _Group) -> None:
        topics = sorted({t for m in group.members for t in m.topics})
        layout = (
            tuple(m.serial for m in group.members),
            tuple((t, len(self._topics.get(t, ()))) for t in topics),
        )
        if layout == group.layout:
            return
        group.layout = layout
        for member in group.members:
            member._revoke_all()
        for topic in topics:
            members = [m for m in group.members if topic in m.topics]
            for p in range(len(self._topics.get(topic, ()))):
                owner = members[p % len(members)]
                owner._assign((topic, p), group.committed.get((topic, p), 0))


class _MemoryPublisher(Publisher):
    def __init__(self, bus: InMemoryBus) -> None:
        self._bus = bus
        self._started = False

    async def start(self) -> None:
        self._started = True

    async def stop(self) -> None:
        self._started = False

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        if not self._started:
            raise RuntimeError("publisher is not started")
        if not isinstance(value, bytes | bytearray):
            raise TypeError("value must be bytes")
        if key is not None and not isinstance(key, bytes | bytearray):
            raise TypeError("key must be bytes or None")
        hdrs = tuple((str(k), bytes(v)) for k, v in headers)
        self._bus._append(topic, bytes(value), None if key is None else bytes(key), hdrs)
        await asyncio.sleep(0)


class _MemorySubscription(Subscription):
    def __init__(self, bus: InMemoryBus, group: str, topics: tuple[str, ...]) -> None:
        if not group:
            raise ValueError("empty group name")
        if not topics:
            raise ValueError("no topics")
        self._bus = bus
        self.group = group
        self.topics = topics
        self._started = False
        self._positions: dict[TopicPartition, int] = {}  # assigned partition -> next offset
        self._committed: dict[TopicPartition, int] = {}  # what this member committed
        self._cursor = 0  # round-robin start over partitions, for fairness
        self.serial = -1

    # called by the bus on rebalance
    def _revoke_all(self) -> None:
        self._positions.clear()
        self._committed.clear()

    def _assign(self, tp: TopicPartition, offset: int) -> None:
        self._positions[tp] = offset

    async def start(self) -> None:
        if self._started:
            return
        grp = self._bus._group(self.group)
        self.serial = next(grp.serials)
        grp.members.append(self)
        self._started = True
        self._bus._rebalance_if_needed(grp)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        grp = self._bus._group(self.group)
        grp.members.remove(self)
        self._revoke_all()
        self._bus._rebalance_if_needed(grp)
        self._bus._notify()  # wake a fetch waiting on this subscription

    def _take(self, max_messages: int) -> list[Message]:
        self._bus._rebalance_if_needed(self._bus._group(self.group))
        tps = sorted(self._positions)
        if not tps:
            return []
        start = self._cursor % len(tps)
        self._cursor += 1
        out: list[Message] = []
        for tp in tps[start:] + tps[:start]:
            log_ = self._bus._topics[tp[0]][tp[1]]
            pos = self._positions[tp]
            take = log_[pos : pos + (max_messages - len(out))]
            if take:
                out.extend(take)
                self._positions[tp] = pos + len(take)
            if len(out) >= max_messages:
                break
        return out

    async def fetch(self, timeout_s: float, max_messages: int = 100) -> list[Message]:
        if not self._started:
            raise RuntimeError("subscription is not started")
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            out = self._take(max_messages)
            if out:
                await asyncio.sleep(0)
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._started:
                return []
            event = self._bus._wait_event()
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return []

    async def commit(self, message: Message) -> None:
        if not self._started:
            raise RuntimeError("subscription is not started")
        grp = self._bus._group(self.group)
        self._bus._rebalance_if_needed(grp)
        tp = (message.topic, message.partition)
        nxt = message.offset + 1
        if tp not in self._positions:
            log.warning(
                "commit of %s[%d]@%d ignored: partition is not assigned to this member "
                "(it will be redelivered to its owner)",
                message.topic,
                message.partition,
                message.offset,
            )
            return
        if self._committed.get(tp, -1) >= nxt:
            return
        self._committed[tp] = nxt
        grp.committed[tp] = nxt
        await asyncio.sleep(0)

    async def lag(self) -> dict[tuple[str, int], int]:
        grp = self._bus._group(self.group)
        return {
            tp: max(0, len(self._bus._topics[tp[0]][tp[1]]) - grp.committed.get(tp, 0))
            for tp in self._positions
        }


# ---------------------------------------------------------------------------------------------
# Object store
# ---------------------------------------------------------------------------------------------


@dataclass
class _Object:
    data: bytes
    content_type: str
    etag: str


class InMemoryObjectStore(ObjectStore):
    """Buckets of immutable byte strings. Missing buckets raise ObjectNotFound, like S3."""

    def __init__(self) -> None:
        self._buckets: dict[str, dict[str, _Object]] = {}

    def _bucket(self, bucket: str) -> dict[str, _Object]:
        try:
            return self._buckets[bucket]
        except KeyError:
            raise ObjectNotFound(f"bucket {bucket!r} does not exist") from None

    def _object(self, bucket: str, key: str) -> _Object:
        try:
            return self._bucket(bucket)[key]
        except KeyError:
            raise ObjectNotFound(f"object {bucket}/{key} does not exist") from None

    @staticmethod
    def _info(bucket: str, key: str, obj: _Object) -> ObjectInfo:
        return ObjectInfo(bucket, key, len(obj.data), obj.etag, obj.content_type)

    def _put(self, bucket: str, key: str, data: bytes, content_type: str) -> ObjectInfo:
        if not key:
            raise ValueError("empty object key")
        objects = self._bucket(bucket)
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        obj = _Object(bytes(data), content_type, etag)
        objects[key] = obj
        return self._info(bucket, key, obj)

    async def ensure_bucket(self, bucket: str) -> None:
        self._buckets.setdefault(bucket, {})

    async def put_bytes(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        return self._put(bucket, key, data, content_type)

    async def put_file(
        self, bucket: str, key: str, path: Path, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        self._bucket(bucket)
        data = await asyncio.to_thread(Path(path).read_bytes)
        return self._put(bucket, key, data, content_type)

    async def get_bytes(self, bucket: str, key: str) -> bytes:
        return self._object(bucket, key).data

    async def get_range(self, bucket: str, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        obj = self._object(bucket, key)
        if length == 0:
            return b""
        return obj.data[offset : offset + length]

    async def download_file(self, bucket: str, key: str, path: Path) -> ObjectInfo:
        obj = self._object(bucket, key)
        target = Path(path)

        def write() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            tmp.write_bytes(obj.data)
            tmp.replace(target)

        await asyncio.to_thread(write)
        return self._info(bucket, key, obj)

    async def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        obj = self._buckets.get(bucket, {}).get(key)
        return None if obj is None else self._info(bucket, key, obj)

    async def delete(self, bucket: str, key: str) -> None:
        self._bucket(bucket).pop(key, None)

    async def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(k for k in self._bucket(bucket) if k.startswith(prefix))


# ---------------------------------------------------------------------------------------------
# Document store
# ---------------------------------------------------------------------------------------------

_MISSING = object()
_OPERATORS = frozenset({"$in", "$ne", "$gte", "$lte", "$exists"})


def _type_rank(v: Any) -> int:
    """BSON comparison order of the types a JSON-like document holds."""
    if v is _EMPTY_ARRAY:
        return 0
    if v is None:
        return 1
    if isinstance(v, bool):
        return 8
    if isinstance(v, int | float):
        return 2
    if isinstance(v, str):
        return 3
    if isinstance(v, dict):
        return 4
    if isinstance(v, list | tuple):
        return 5
    if isinstance(v, bytes | bytearray):
        return 6
    if isinstance(v, _dt.datetime):
        return 9
    return 10


def _eq(a: Any, b: Any) -> bool:
    """BSON equality: values of different type classes never compare equal (True != 1)."""
    if _type_rank(a) != _type_rank(b):
        return False
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _cmp(a: Any, b: Any) -> int:
    """BSON ordering: by type class first, then by value (documents field by field)."""
    ra, rb = _type_rank(a), _type_rank(b)
    if ra != rb:
        return -1 if ra < rb else 1
    if isinstance(a, dict):
        return _cmp_seq([[k, v] for k, v in a.items()], [[k, v] for k, v in b.items()])
    if isinstance(a, list | tuple):
        return _cmp_seq(a, b)
    if a == b:
        return 0
    return -1 if a < b else 1


def _cmp_seq(a: Sequence[Any], b: Sequence[Any]) -> int:
    for x, y in zip(a, b, strict=False):
        c = _cmp(x, y)
        if c:
            return c
    return (len(a) > len(b)) - (len(a) < len(b))


def _candidates(value: Any, parts: Sequence[str]) -> list[Any]:
    """Values a dotted path reaches, descending into arrays like MongoDB does."""
    if not parts:
        return [value]
    head, rest = parts[0], parts[1:]
    if isinstance(value, dict):
        return _candidates(value[head], rest) if head in value else []
    if isinstance(value, list):
        out: list[Any] = []
        if head.isdigit() and int(head) < len(value):
            out.extend(_candidates(value[int(head)], rest))
        for element in value:
            if isinstance(element, dict):
                out.extend(_candidates(element, parts))
        return out
    return []


def _expanded(values: list[Any]) -> list[Any]:
    """Each value, plus the elements of each array value (how MongoDB matches arrays)."""
    out: list[Any] = []
    for v in values:
        out.append(v)
        if isinstance(v, list):
            out.extend(v)
    return out


def _matches_value(values: list[Any], wanted: Any) -> bool:
    if wanted is None and not values:
        return True
    return any(_eq(v, wanted) for v in _expanded(values))


def _matches_condition(doc: Document, path: str, cond: Any) -> bool:
    values = _candidates(doc, path.split("."))
    is_ops = isinstance(cond, Mapping) and bool(cond) and all(str(k).startswith("$") for k in cond)
    if not is_ops:
        if isinstance(cond, Mapping) and any(str(k).startswith("$") for k in cond):
            raise ValueError(f"cannot mix operators and fields in the condition on {path!r}")
        return _matches_value(values, cond)
    for op, arg in cond.items():
        if op not in _OPERATORS:
            raise ValueError(f"unsupported filter operator {op!r} (the port allows {_OPERATORS})")
        if op == "$in":
            if not isinstance(arg, list | tuple):
                raise ValueError("$in needs an array")
            ok = any(_matches_value(values, a) for a in arg)
        elif op == "$ne":
            ok = not _matches_value(values, arg)
        elif op == "$exists":
            ok = bool(values) == bool(arg)
        else:
            ok = False
            for v in _expanded(values):
                if _type_rank(v) == _type_rank(arg) and not isinstance(v, list):
                    c = _cmp(v, arg)
                    if (op == "$gte" and c >= 0) or (op == "$lte" and c <= 0):
                        ok = True
                        break
        if not ok:
            return False
    return True


def _matches(doc: Document, flt: Filter) -> bool:
    for path, cond in flt.items():
        if path.startswith("$"):
            raise ValueError(f"unsupported top-level filter operator {path!r}")
        if not _matches_condition(doc, path, cond):
            return False
    return True


def _get_path(doc: Any, path: str) -> Any:
    cur = doc
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def _parent_for_write(doc: Document, path: str) -> tuple[dict[str, Any], str]:
    parts = path.split(".")
    cur: Any = doc
    for part in parts[:-1]:
        if isinstance(cur, dict):
            nxt = cur.get(part, _MISSING)
            if nxt is _MISSING:
                nxt = cur[part] = {}
            cur = nxt
        else:
            raise TypeError(f"cannot create field {path!r}: {part!r} is not in a document")
    if not isinstance(cur, dict):
        raise TypeError(f"cannot create field {path!r}: its parent is not a document")
    return cur, parts[-1]


def _set_path(doc: Document, path: str, value: Any) -> None:
    parent, leaf = _parent_for_write(doc, path)
    parent[leaf] = _normalise(value)


def _array_at(doc: Document, path: str, op: str) -> list[Any]:
    parent, leaf = _parent_for_write(doc, path)
    current = parent.setdefault(leaf, [])
    if not isinstance(current, list):
        raise TypeError(f"{op} needs an array at {path!r}, found {type(current).__name__}")
    return current


def _reject_nested_arrays(value: Any, path: str = "", in_array: bool = False) -> None:
    """Raise ValueError for an array directly inside an array: FerretDB v1 refuses them, so
    the port leaves them out (the Mongo adapter checks the same way)."""
    if isinstance(value, list | tuple):
        if in_array:
            raise ValueError(f"nested arrays are not supported (at {path or 'the value'})")
        for i, item in enumerate(value):
            _reject_nested_arrays(item, f"{path}.{i}" if path else str(i), True)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _reject_nested_arrays(item, f"{path}.{key}" if path else str(key), False)


def _normalise(value: Any) -> Any:
    """Deep copy as a BSON round trip would return it: tuples become lists, datetimes become
    aware UTC with millisecond precision (the client runs with tz_aware=True)."""
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, _dt.datetime):
        utc = value.replace(tzinfo=_dt.UTC) if value.tzinfo is None else value.astimezone(_dt.UTC)
        return utc.replace(microsecond=utc.microsecond // 1000 * 1000)
    return copy.deepcopy(value)


class _EmptyArray:
    """Sort value of a field holding only empty arrays: MongoDB sorts it before null."""


_EMPTY_ARRAY = _EmptyArray()


def _crosses_array(doc: Document, parts: Sequence[str]) -> bool:
    """Whether some step of a dotted path (before its last field) is an array."""
    cur: Any = doc
    for part in parts[:-1]:
        if not isinstance(cur, dict) or part not in cur:
            return False
        cur = cur[part]
        if isinstance(cur, list):
            return True
    return False


def _sort_value(doc: Document, path: str, descending: bool) -> Any:
    """MongoDB's sort key: an array sorts by its smallest element ascending, by its largest
    descending; a missing field sorts as null. A dotted path that goes *through* an array is
    refused: FerretDB v1 silently sorts such documents as if the field were missing."""
    parts = path.split(".")
    if _crosses_array(doc, parts):
        raise ValueError(f"cannot sort on {path!r}: it goes through an array")
    found = _candidates(doc, parts)
    if not found:
        return None
    flat: list[Any] = []
    for v in found:
        if isinstance(v, list):
            flat.extend(v)
        else:
            flat.append(v)
    if not flat:
        return _EMPTY_ARRAY
    key = functools.cmp_to_key(_cmp)
    return max(flat, key=key) if descending else min(flat, key=key)


def _sort_key(sort: Sequence[tuple[str, int]]) -> Any:
    def compare(a: Document, b: Document) -> int:
        for path, direction in sort:
            descending = direction < 0
            c = _cmp(_sort_value(a, path, descending), _sort_value(b, path, descending))
            if c:
                return -c if descending else c
        return 0

    return functools.cmp_to_key(compare)


def _canonical(v: Any) -> Any:
    """A hashable form of a value under BSON equality (1 == 1.0, True != 1), for index keys."""
    if v is None or v is _MISSING:
        return ("null",)
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, int | float):
        return ("num", float(v))
    if isinstance(v, Mapping):
        return ("doc", tuple((str(k), _canonical(x)) for k, x in v.items()))
    if isinstance(v, list | tuple):
        return ("arr", tuple(_canonical(x) for x in v))
    return (type(v).__name__, v)


@dataclass(frozen=True)
class _Index:
    fields: tuple[str, ...]
    unique: bool

    def key(self, doc: Document) -> tuple[Any, ...]:
        return tuple(_canonical(_get_path(doc, f)) for f in self.fields)


class InMemoryCollection(Collection):
    def __init__(self, name: str) -> None:
        self.name = name
        self._docs: dict[str, Document] = {}  # insertion order = natural order
        self._indexes: list[_Index] = []

    def _check_unique(self, doc: Document, replacing: str | None = None) -> None:
        for index in self._indexes:
            if not index.unique:
                continue
            key = index.key(doc)
            for other_id, other in self._docs.items():
                if other_id != replacing and index.key(other) == key:
                    raise DuplicateKey(f"{self.name}: duplicate key on {index.fields}: {key!r}")

    async def insert(self, doc: Document) -> None:
        doc_id = doc.get("_id")
        if not isinstance(doc_id, str):
            raise TypeError("documents need a string _id")
        if doc_id in self._docs:
            raise DuplicateKey(f"{self.name}: duplicate _id {doc_id!r}")
        _reject_nested_arrays(doc)
        stored = _normalise(doc)
        self._check_unique(stored)
        self._docs[doc_id] = stored

    async def get(self, doc_id: str) -> Document | None:
        doc = self._docs.get(doc_id)
        return None if doc is None else _normalise(doc)

    def _matching(self, flt: Filter) -> list[Document]:
        return [d for d in self._docs.values() if _matches(d, flt)]

    async def find_one(self, flt: Filter) -> Document | None:
        for doc in self._docs.values():
            if _matches(doc, flt):
                return _normalise(doc)
        return None

    async def find(
        self,
        flt: Filter,
        *,
        sort: Sequence[tuple[str, int]] = (),
        skip: int = 0,
        limit: int = 0,
    ) -> list[Document]:
        if skip < 0 or limit < 0:
            raise ValueError("skip and limit must be >= 0")
        docs = self._matching(flt)
        if sort:
            docs.sort(key=_sort_key(sort))
        docs = docs[skip:]
        if limit:
            docs = docs[:limit]
        return [_normalise(d) for d in docs]

    async def count(self, flt: Filter) -> int:
        return len(self._matching(flt))

    async def update(
        self,
        flt: Filter,
        *,
        set_fields: Mapping[str, Any] | None = None,
        push: Mapping[str, Any] | None = None,
        add_to_set: Mapping[str, Any] | None = None,
        set_on_insert: Mapping[str, Any] | None = None,
        upsert: bool = False,
    ) -> bool:
        if not (set_fields or push or add_to_set or set_on_insert):
            raise ValueError("update needs at least one of the update operators")
        _check_conflicts(set_fields, push, add_to_set, set_on_insert)
        for fields, inside_array in (
            (set_fields, False),
            (push, True),
            (add_to_set, True),
            (set_on_insert, False),
        ):
            for path, value in (fields or {}).items():
                _reject_nested_arrays(value, path, inside_array)
        current = next((d for d in self._docs.values() if _matches(d, flt)), None)
        if current is None:
            if not upsert:
                return False
            new = _upsert_seed(flt)
            for path, value in (set_on_insert or {}).items():
                _set_path(new, path, value)
            doc = new
        else:
            doc = _normalise(current)
        if (
            current is not None
            and set_fields
            and "_id" in set_fields
            and not _eq(set_fields["_id"], current["_id"])
        ):
            raise ValueError("_id is immutable")
        for path, value in (set_fields or {}).items():
            _set_path(doc, path, value)
        for path, value in (push or {}).items():
            _array_at(doc, path, "$push").append(_normalise(value))
        for path, value in (add_to_set or {}).items():
            arr = _array_at(doc, path, "$addToSet")
            if not any(_eq(v, value) for v in arr):
                arr.append(_normalise(value))
        if current is None:
            doc_id = doc.get("_id")
            if not isinstance(doc_id, str):
                raise ValueError("an upsert needs a string _id (in the filter or set_on_insert)")
            if doc_id in self._docs:
                raise DuplicateKey(f"{self.name}: duplicate _id {doc_id!r}")
            self._check_unique(doc)
            self._docs[doc_id] = doc
        else:
            self._check_unique(doc, replacing=current["_id"])
            self._docs[current["_id"]] = doc
        return True

    async def delete(self, flt: Filter) -> int:
        ids = [d["_id"] for d in self._matching(flt)]
        for doc_id in ids:
            del self._docs[doc_id]
        return len(ids)

    async def ensure_index(
        self, fields: Sequence[tuple[str, int]], *, unique: bool = False
    ) -> None:
        if not fields:
            raise ValueError("an index needs at least one field")
        names = tuple(f for f, _ in fields)
        for index in self._indexes:
            if index.fields == names:
                if index.unique != unique:
                    raise ValueError(f"index on {names} exists with unique={index.unique}")
                return
        index = _Index(names, unique)
        if unique:
            seen: set[tuple[Any, ...]] = set()
            for doc in self._docs.values():
                key = index.key(doc)
                if key in seen:
                    raise DuplicateKey(f"{self.name}: existing duplicates on {names}: {key!r}")
                seen.add(key)
        self._indexes.append(index)


def _check_conflicts(*ops: Mapping[str, Any] | None) -> None:
    """MongoDB refuses an update touching one path (or a path and its prefix) twice."""
    paths = [p for op in ops for p in (op or {})]
    for a, b in itertools.combinations(paths, 2):
        if a == b or a.startswith(b + ".") or b.startswith(a + "."):
            raise ValueError(f"update would create a conflict at {a!r} / {b!r}")


def _upsert_seed(flt: Filter) -> Document:
    """The document an upsert starts from: the equality conditions of the filter."""
    doc: Document = {}
    for path, cond in flt.items():
        if isinstance(cond, Mapping) and any(str(k).startswith("$") for k in cond):
            continue
        _set_path(doc, path, cond)
    return doc


class InMemoryDocumentStore(DocumentStore):
    def __init__(self) -> None:
        self._collections: dict[str, InMemoryCollection] = {}

    def collection(self, name: str) -> Collection:
        if not name:
            raise ValueError("empty collection name")
        coll = self._collections.get(name)
        if coll is None:
            coll = self._collections[name] = InMemoryCollection(name)
        return coll

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
