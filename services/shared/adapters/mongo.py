"""DocumentStore over MongoDB (or FerretDB v1), through PyMongo's native AsyncMongoClient.

Only single-document writes, plain `find`s and the `count` command are used, never
transactions, change streams or aggregation pipelines, so FerretDB v1 serves all of it.

FerretDB v1 differences this adapter absorbs:

* a unique-index violation by an update, an upsert or `createIndexes` may come back as
  `InternalError` (code 1) carrying the backend's text instead of E11000 (SQLite: "UNIQUE
  constraint failed"; PostgreSQL: SQLSTATE 23505, unique_violation); all are DuplicateKey;
* arrays directly inside arrays are rejected ("nested arrays are not supported"); the port
  excludes them, and this adapter refuses them up front with ValueError, like the fake does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, OperationFailure

from services.shared.ports.documents import (
    Collection,
    Document,
    DocumentStore,
    DuplicateKey,
    Filter,
)

__all__ = ["MongoCollection", "MongoDocumentStore"]

# How a unique-index violation reads when the server does not say E11000: FerretDB v1 over
# SQLite and over PostgreSQL.
_DUPLICATE_MARKERS = (
    "UNIQUE constraint failed",
    "duplicate key value violates unique",
    "(SQLSTATE 23505)",
)


def _duplicate(exc: OperationFailure) -> bool:
    if isinstance(exc, DuplicateKeyError) or exc.code == 11000:
        return True
    text = str(exc)
    return any(marker in text for marker in _DUPLICATE_MARKERS)


def _reject_conflicts(*ops: Mapping[str, Any] | None) -> None:
    """ValueError (not a server WriteError) when an update names a path, or a path and its
    prefix, twice: MongoDB and FerretDB refuse that, and the fake raises the same."""
    paths = [p for op in ops for p in (op or {})]
    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            if a == b or a.startswith(b + ".") or b.startswith(a + "."):
                raise ValueError(f"update would create a conflict at {a!r} / {b!r}")


def _reject_nested_arrays(value: Any, path: str = "", in_array: bool = False) -> None:
    """Raise ValueError for an array directly inside an array (outside the port's subset)."""
    if isinstance(value, list | tuple):
        if in_array:
            raise ValueError(f"nested arrays are not supported (at {path or 'the value'})")
        for i, item in enumerate(value):
            _reject_nested_arrays(item, f"{path}.{i}" if path else str(i), True)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _reject_nested_arrays(item, f"{path}.{key}" if path else str(key), False)


class MongoCollection(Collection):
    def __init__(self, db: AsyncDatabase[Document], name: str) -> None:
        self.name = name
        self._db = db
        self._coll: AsyncCollection[Document] = db[name]

    async def insert(self, doc: Document) -> None:
        if not isinstance(doc.get("_id"), str):
            raise TypeError("documents need a string _id")
        _reject_nested_arrays(doc)
        try:
            # a copy: insert_one would otherwise write into the caller's dict
            await self._coll.insert_one(dict(doc))
        except OperationFailure as exc:
            if _duplicate(exc):
                raise DuplicateKey(f"{self.name}: {exc.details or exc}") from exc
            raise

    async def get(self, doc_id: str) -> Document | None:
        return await self._coll.find_one({"_id": doc_id})

    async def find_one(self, flt: Filter) -> Document | None:
        return await self._coll.find_one(dict(flt))

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
        cursor = self._coll.find(dict(flt), skip=skip, limit=limit)
        if sort:
            cursor = cursor.sort([(f, 1 if d >= 0 else -1) for f, d in sort])
        return await cursor.to_list()

    async def count(self, flt: Filter) -> int:
        # The `count` command, not count_documents (an aggregation pipeline).
        result = await self._db.command("count", self.name, query=dict(flt))
        return int(result["n"])

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
        update: dict[str, Any] = {}
        for op, fields in (
            ("$set", set_fields),
            ("$push", push),
            ("$addToSet", add_to_set),
            ("$setOnInsert", set_on_insert),
        ):
            if fields:
                for path, value in fields.items():
                    # $push/$addToSet put the value inside an array
                    _reject_nested_arrays(value, path, op in ("$push", "$addToSet"))
                update[op] = dict(fields)
        if not update:
            raise ValueError("update needs at least one of the update operators")
        _reject_conflicts(set_fields, push, add_to_set, set_on_insert)
        if upsert and not _upsert_sets_string_id(flt, set_fields, set_on_insert):
            raise ValueError("an upsert needs a string _id (in the filter or set_on_insert)")
        try:
            result = await self._coll.update_one(dict(flt), update, upsert=upsert)
        except OperationFailure as exc:
            if _duplicate(exc):
                raise DuplicateKey(f"{self.name}: {exc.details or exc}") from exc
            raise
        return result.matched_count > 0 or result.upserted_id is not None

    async def delete(self, flt: Filter) -> int:
        result = await self._coll.delete_many(dict(flt))
        return result.deleted_count

    async def ensure_index(
        self, fields: Sequence[tuple[str, int]], *, unique: bool = False
    ) -> None:
        if not fields:
            raise ValueError("an index needs at least one field")
        keys = [(f, 1 if d >= 0 else -1) for f, d in fields]
        try:
            await self._coll.create_index(keys, unique=unique)
        except OperationFailure as exc:
            if _duplicate(exc):
                raise DuplicateKey(f"{self.name}: existing duplicates: {exc}") from exc
            raise


def _upsert_sets_string_id(
    flt: Filter, set_fields: Mapping[str, Any] | None, set_on_insert: Mapping[str, Any] | None
) -> bool:
    """Whether an upserted document gets a string `_id` (else MongoDB invents an ObjectId)."""
    for source in (flt, set_fields or {}, set_on_insert or {}):
        if isinstance(source.get("_id"), str):
            return True
    return False


class MongoDocumentStore(DocumentStore):
    def __init__(
        self,
        uri: str,
        database: str,
        *,
        server_selection_timeout_ms: int = 5_000,
        connect_timeout_ms: int = 5_000,
        app_name: str = "tessera",
    ) -> None:
        self.database = database
        self._client: AsyncMongoClient[Document] = AsyncMongoClient(
            uri,
            serverSelectionTimeoutMS=server_selection_timeout_ms,
            connectTimeoutMS=connect_timeout_ms,
            appname=app_name,
            tz_aware=True,
        )
        self._db: AsyncDatabase[Document] = self._client[database]
        self._collections: dict[str, MongoCollection] = {}

    def collection(self, name: str) -> Collection:
        if not name:
            raise ValueError("empty collection name")
        coll = self._collections.get(name)
        if coll is None:
            coll = self._collections[name] = MongoCollection(self._db, name)
        return coll

    async def ping(self) -> None:
        await self._client.admin.command("ping")

    async def close(self) -> None:
        await self._client.close()
