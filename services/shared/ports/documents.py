"""Port: a document store (MongoDB in production, reached with PyMongo's AsyncMongoClient).

Deliberately a small subset of MongoDB that FerretDB v1 also serves: no transactions, no
change streams, no aggregation. Filters are equality (`{"a.b": v}`), `{"$in": [...]}`,
`{"$ne": v}`, `{"$gte": v}`, `{"$lte": v}` and `{"$exists": bool}` on fields. Documents are
plain JSON-like dicts with a string `_id`. An array may not directly contain an array
(FerretDB v1 refuses nested arrays), so `push`/`add_to_set` take non-list values; adapters
raise ValueError for a nested array. Arrays of documents that hold arrays are fine.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

Document = dict[str, Any]
Filter = Mapping[str, Any]


class DuplicateKey(Exception):
    """An insert or upsert violated a unique index (or `_id`)."""


class Collection(abc.ABC):
    name: str

    @abc.abstractmethod
    async def insert(self, doc: Document) -> None:
        """Insert; raises DuplicateKey when `_id` or a unique index already holds the value."""

    @abc.abstractmethod
    async def get(self, doc_id: str) -> Document | None: ...

    @abc.abstractmethod
    async def find_one(self, flt: Filter) -> Document | None: ...

    @abc.abstractmethod
    async def find(
        self,
        flt: Filter,
        *,
        sort: Sequence[tuple[str, int]] = (),
        skip: int = 0,
        limit: int = 0,
    ) -> list[Document]:
        """Matching documents; `sort` is (field, 1 | -1) pairs; limit 0 means no limit."""

    @abc.abstractmethod
    async def count(self, flt: Filter) -> int: ...

    @abc.abstractmethod
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
        """Update the first matching document. Returns True if one matched or was upserted.

        `push` appends one value per field; `add_to_set` appends when not present. With
        `upsert`, a missing document is created from the equality parts of `flt`,
        `set_on_insert` and the updates.
        """

    @abc.abstractmethod
    async def delete(self, flt: Filter) -> int:
        """Delete all matching documents; returns how many."""

    @abc.abstractmethod
    async def ensure_index(
        self, fields: Sequence[tuple[str, int]], *, unique: bool = False
    ) -> None: ...


class DocumentStore(abc.ABC):
    @abc.abstractmethod
    def collection(self, name: str) -> Collection: ...

    @abc.abstractmethod
    async def ping(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...
