"""Contract of the DocumentStore port (services/shared/ports/documents.py).

Runs against InMemoryDocumentStore and MongoDocumentStore over FerretDB v1 (the
`document_env` fixture, conftest.py). Only the documented subset is exercised.
"""

from __future__ import annotations

import datetime as dt

import pytest

from services.shared.ports.documents import DuplicateKey

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)

SEED = [
    {
        "_id": "a",
        "n": 1,
        "s": "x",
        "tags": ["red", "big"],
        "meta": {"site": "s1", "score": 0.5},
        "at": T0,
        "opt": None,
    },
    {
        "_id": "b",
        "n": 2,
        "s": "y",
        "tags": ["blue"],
        "meta": {"site": "s2", "score": 1.5},
        "at": T0 + dt.timedelta(days=1),
    },
    {
        "_id": "c",
        "n": 3,
        "s": "z",
        "tags": [],
        "meta": {"site": "s1", "score": 2.5},
        "at": T0 + dt.timedelta(days=2),
        "extra": True,
    },
]


async def seeded(document_env, name: str = "items"):
    coll = document_env.store.collection(name)
    for doc in SEED:
        await coll.insert(dict(doc))
    return coll


async def ids(coll, flt, **kw) -> list[str]:
    return [d["_id"] for d in await coll.find(flt, **kw)]


async def test_ping(document_env):
    await document_env.store.ping()


async def test_insert_and_get_round_trip(document_env):
    coll = document_env.store.collection("things")
    assert coll.name == "things"
    doc = {
        "_id": "t1",
        "text": "héllo",
        "int": 42,
        "float": 1.25,
        "flag": False,
        "none": None,
        "raw": b"\x00\x01bytes",
        "when": T0,
        "nested": {"list": [1, "two", {"three": 3}], "empty": {}},
    }
    await coll.insert(doc)
    assert doc["_id"] == "t1"
    assert set(doc) == {"_id", "text", "int", "float", "flag", "none", "raw", "when", "nested"}
    got = await coll.get("t1")
    assert got == doc
    assert got["when"].tzinfo is not None
    assert await coll.get("missing") is None
    assert await coll.find_one({"nested.list": "two"}) == doc
    assert await coll.find_one({"text": "nope"}) is None

    # what comes back is a copy: changing it does not change the store
    got["int"] = 0
    got["nested"]["list"].append(4)
    assert await coll.get("t1") == doc


async def test_insert_duplicate_id_raises(document_env):
    coll = document_env.store.collection("dups")
    await coll.insert({"_id": "x", "v": 1})
    with pytest.raises(DuplicateKey):
        await coll.insert({"_id": "x", "v": 2})
    assert (await coll.get("x")) == {"_id": "x", "v": 1}
    assert await coll.count({}) == 1


async def test_unique_index(document_env):
    coll = document_env.store.collection("slides")
    await coll.ensure_index([("sha256", 1)], unique=True)
    await coll.ensure_index([("sha256", 1)], unique=True)  # idempotent
    await coll.ensure_index([("site", 1), ("created", -1)])  # non-unique, compound
    await coll.insert({"_id": "s1", "sha256": "aaa", "site": "x"})
    await coll.insert({"_id": "s2", "sha256": "bbb", "site": "x"})
    with pytest.raises(DuplicateKey):
        await coll.insert({"_id": "s3", "sha256": "aaa", "site": "y"})
    assert await coll.get("s3") is None
    # an update or upsert that would duplicate the value is refused too
    with pytest.raises(DuplicateKey):
        await coll.update({"_id": "s2"}, set_fields={"sha256": "aaa"})
    with pytest.raises(DuplicateKey):
        await coll.update({"_id": "s4"}, set_fields={"sha256": "bbb"}, upsert=True)
    assert await coll.count({}) == 2
    assert (await coll.get("s2"))["sha256"] == "bbb"


async def test_compound_unique_index(document_env):
    coll = document_env.store.collection("pairs")
    await coll.ensure_index([("study", 1), ("n", 1)], unique=True)
    await coll.insert({"_id": "1", "study": "A", "n": 1})
    await coll.insert({"_id": "2", "study": "A", "n": 2})
    await coll.insert({"_id": "3", "study": "B", "n": 1})
    with pytest.raises(DuplicateKey):
        await coll.insert({"_id": "4", "study": "A", "n": 1})


async def test_unique_index_over_existing_duplicates_fails(document_env):
    coll = document_env.store.collection("predup")
    await coll.insert({"_id": "1", "k": "same"})
    await coll.insert({"_id": "2", "k": "same"})
    with pytest.raises(DuplicateKey):
        await coll.ensure_index([("k", 1)], unique=True)


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({}, ["a", "b", "c"]),
        ({"_id": "b"}, ["b"]),
        ({"s": "y"}, ["b"]),
        ({"n": 3, "s": "z"}, ["c"]),
        ({"n": 3, "s": "x"}, []),
        # equality against an array field matches an element
        ({"tags": "red"}, ["a"]),
        # $in
        ({"n": {"$in": [1, 3]}}, ["a", "c"]),
        ({"_id": {"$in": ["b", "zz"]}}, ["b"]),
        ({"tags": {"$in": ["blue", "big"]}}, ["a", "b"]),
        ({"s": {"$in": []}}, []),
        # $ne (on arrays: no element equals the value)
        ({"s": {"$ne": "x"}}, ["b", "c"]),
        ({"tags": {"$ne": "red"}}, ["b", "c"]),
        ({"extra": {"$ne": True}}, ["a", "b"]),
        # $gte / $lte on numbers, strings and datetimes
        ({"n": {"$gte": 2}}, ["b", "c"]),
        ({"n": {"$lte": 2}}, ["a", "b"]),
        ({"n": {"$gte": 2, "$lte": 2}}, ["b"]),
        ({"s": {"$gte": "y"}}, ["b", "c"]),
        ({"at": {"$gte": T0 + dt.timedelta(hours=1)}}, ["b", "c"]),
        ({"at": {"$lte": T0}}, ["a"]),
        # $exists
        ({"extra": {"$exists": True}}, ["c"]),
        ({"extra": {"$exists": False}}, ["a", "b"]),
        ({"opt": {"$exists": True}}, ["a"]),
        # dotted paths into embedded documents
        ({"meta.site": "s1"}, ["a", "c"]),
        ({"meta.score": {"$gte": 1.0}}, ["b", "c"]),
        ({"meta.site": {"$in": ["s2"]}}, ["b"]),
        ({"meta.site": {"$ne": "s1"}}, ["b"]),
        ({"meta.nothing": {"$exists": True}}, []),
        ({"meta.site": "s1", "n": {"$gte": 2}}, ["c"]),
        # whole embedded document equality
        ({"meta": {"site": "s2", "score": 1.5}}, ["b"]),
    ],
)
async def test_find_filters(document_env, flt, expected):
    coll = await seeded(document_env)
    assert sorted(await ids(coll, flt)) == expected
    assert await coll.count(flt) == len(expected)
    one = await coll.find_one(flt)
    if expected:
        assert one is not None
        assert one["_id"] in expected
    else:
        assert one is None


async def test_equality_with_none_matches_null_and_missing(document_env):
    coll = await seeded(document_env)
    assert sorted(await ids(coll, {"opt": None})) == ["a", "b", "c"]
    assert sorted(await ids(coll, {"opt": {"$ne": None}})) == []


async def test_sort_skip_limit(document_env):
    coll = await seeded(document_env)
    assert await ids(coll, {}, sort=[("n", 1)]) == ["a", "b", "c"]
    assert await ids(coll, {}, sort=[("n", -1)]) == ["c", "b", "a"]
    assert await ids(coll, {}, sort=[("n", -1)], limit=2) == ["c", "b"]
    assert await ids(coll, {}, sort=[("n", -1)], skip=1) == ["b", "a"]
    assert await ids(coll, {}, sort=[("n", -1)], skip=1, limit=1) == ["b"]
    assert await ids(coll, {}, sort=[("n", 1)], skip=5) == []
    assert await ids(coll, {}, sort=[("n", 1)], limit=0) == ["a", "b", "c"]
    assert await ids(coll, {}, sort=[("at", -1)]) == ["c", "b", "a"]
    assert await ids(coll, {}, sort=[("s", 1)]) == ["a", "b", "c"]
    # several keys, a dotted one first
    assert await ids(coll, {}, sort=[("meta.site", 1), ("n", -1)]) == ["c", "a", "b"]
    assert await ids(coll, {"meta.site": "s1"}, sort=[("meta.score", -1)]) == ["c", "a"]


async def test_sort_on_an_array_field(document_env):
    """An array sorts by its smallest element ascending and its largest descending; a field
    holding an empty array sorts before null and missing ones."""
    coll = document_env.store.collection("arrsort")
    for doc in [
        {"_id": "one", "v": 1},
        {"_id": "pair", "v": [3, 0]},
        {"_id": "empty", "v": []},
        {"_id": "null", "v": None},
        {"_id": "big", "v": 2.5},
    ]:
        await coll.insert(doc)
    assert await ids(coll, {}, sort=[("v", 1)]) == ["empty", "null", "pair", "one", "big"]
    assert await ids(coll, {}, sort=[("v", -1)]) == ["pair", "big", "one", "null", "empty"]


async def test_count(document_env):
    coll = await seeded(document_env)
    assert await coll.count({}) == 3
    assert await coll.count({"meta.site": "s1"}) == 2
    assert await coll.count({"n": {"$gte": 10}}) == 0
    assert await document_env.store.collection("empty").count({}) == 0


async def test_update_set(document_env):
    coll = await seeded(document_env)
    assert await coll.update({"_id": "a"}, set_fields={"s": "q", "meta.score": 9, "new.deep": 1})
    doc = await coll.get("a")
    assert doc["s"] == "q"
    assert doc["meta"] == {"site": "s1", "score": 9}  # a dotted $set keeps the siblings
    assert doc["new"] == {"deep": 1}
    assert doc["tags"] == ["red", "big"]
    assert not await coll.update({"_id": "nope"}, set_fields={"s": "q"})
    assert await coll.get("nope") is None


async def test_update_changes_only_the_first_match(document_env):
    coll = await seeded(document_env)
    assert await coll.update({"meta.site": "s1"}, set_fields={"flag": 1})
    assert await coll.count({"flag": 1}) == 1


async def test_update_push(document_env):
    coll = await seeded(document_env)
    assert await coll.update({"_id": "a"}, push={"tags": "red", "log": {"step": 1}})
    assert await coll.update({"_id": "a"}, push={"log": {"step": 2}})
    doc = await coll.get("a")
    assert doc["tags"] == ["red", "big", "red"]  # $push appends even when present
    assert doc["log"] == [{"step": 1}, {"step": 2}]
    # a list value would be pushed as one element: an array in an array, outside the subset
    with pytest.raises(ValueError, match="nested arrays"):
        await coll.update({"_id": "b"}, push={"tags": ["x", "y"]})
    assert (await coll.get("b"))["tags"] == ["blue"]


async def test_update_add_to_set(document_env):
    coll = await seeded(document_env)
    assert await coll.update({"_id": "a"}, add_to_set={"tags": "red"})
    assert (await coll.get("a"))["tags"] == ["red", "big"]
    assert await coll.update({"_id": "a"}, add_to_set={"tags": "new", "fresh": 1})
    doc = await coll.get("a")
    assert doc["tags"] == ["red", "big", "new"]
    assert doc["fresh"] == [1]


async def test_update_several_operators_at_once(document_env):
    coll = await seeded(document_env)
    assert await coll.update(
        {"_id": "c"},
        set_fields={"state": "done"},
        push={"history": "done"},
        add_to_set={"tags": "final"},
        set_on_insert={"created": "never"},  # the document exists: ignored
    )
    doc = await coll.get("c")
    assert doc["state"] == "done"
    assert doc["history"] == ["done"]
    assert doc["tags"] == ["final"]
    assert "created" not in doc


async def test_conditional_update_applies_an_event_once(document_env):
    coll = document_env.store.collection("aggregates")
    await coll.insert({"_id": "slide-1", "applied": [], "events": []})
    for _ in range(2):
        applied = await coll.update(
            {"_id": "slide-1", "applied": {"$ne": "e1"}},
            push={"events": {"id": "e1", "kind": "ingested"}},
            add_to_set={"applied": "e1"},
        )
        assert applied is (_ == 0)
    assert await coll.update(
        {"_id": "slide-1", "applied": {"$ne": "e2"}},
        push={"events": {"id": "e2", "kind": "tiled"}},
        add_to_set={"applied": "e2"},
    )
    doc = await coll.get("slide-1")
    assert doc["applied"] == ["e1", "e2"]
    assert doc["events"] == [{"id": "e1", "kind": "ingested"}, {"id": "e2", "kind": "tiled"}]


async def test_upsert(document_env):
    coll = document_env.store.collection("upserts")
    assert await coll.update(
        {"_id": "u1", "kind": "slide"},
        set_fields={"v": 1},
        set_on_insert={"created": "t0"},
        upsert=True,
    )
    assert await coll.get("u1") == {"_id": "u1", "kind": "slide", "v": 1, "created": "t0"}
    # the second time it matches: set_on_insert is not applied again
    assert await coll.update(
        {"_id": "u1", "kind": "slide"},
        set_fields={"v": 2},
        set_on_insert={"created": "t1"},
        upsert=True,
    )
    assert await coll.get("u1") == {"_id": "u1", "kind": "slide", "v": 2, "created": "t0"}
    # the seed takes equality parts only (not operators), dotted paths become nested
    assert await coll.update(
        {"_id": "u2", "meta.site": "s9", "n": {"$gte": 5}},
        push={"events": "e1"},
        add_to_set={"applied": "e1"},
        upsert=True,
    )
    assert await coll.get("u2") == {
        "_id": "u2",
        "meta": {"site": "s9"},
        "events": ["e1"],
        "applied": ["e1"],
    }
    # set_on_insert alone
    assert await coll.update({"_id": "u3"}, set_on_insert={"a": 1}, upsert=True)
    assert await coll.update({"_id": "u3"}, set_on_insert={"a": 2}, upsert=True)
    assert await coll.get("u3") == {"_id": "u3", "a": 1}
    assert await coll.count({}) == 3


async def test_an_update_naming_a_path_twice_is_refused(document_env):
    coll = await seeded(document_env)
    with pytest.raises(ValueError, match="conflict"):
        await coll.update({"_id": "a"}, set_fields={"x": 1}, set_on_insert={"x": 2}, upsert=True)
    with pytest.raises(ValueError, match="conflict"):
        await coll.update({"_id": "a"}, set_fields={"meta": {}}, push={"meta.list": 1})
    assert (await coll.get("a"))["meta"] == {"site": "s1", "score": 0.5}


async def test_unique_index_refuses_a_second_null(document_env):
    coll = document_env.store.collection("nulls")
    await coll.ensure_index([("ref", 1)], unique=True)
    await coll.insert({"_id": "1", "ref": None})
    with pytest.raises(DuplicateKey):
        await coll.insert({"_id": "2", "ref": None})
    # numbers compare by value: 1 and 1.0 are the same key
    await coll.insert({"_id": "3", "ref": 1})
    with pytest.raises(DuplicateKey):
        await coll.insert({"_id": "4", "ref": 1.0})


async def test_delete(document_env):
    coll = await seeded(document_env)
    assert await coll.delete({"n": {"$gte": 2}}) == 2
    assert await coll.delete({"n": {"$gte": 2}}) == 0
    assert await ids(coll, {}) == ["a"]
    assert await coll.delete({"_id": "a"}) == 1
    assert await coll.get("a") is None
    assert await coll.count({}) == 0


async def test_nested_arrays_are_refused(document_env):
    """FerretDB v1 cannot store an array directly inside an array; the port excludes them."""
    coll = document_env.store.collection("nested")
    with pytest.raises(ValueError, match="nested arrays"):
        await coll.insert({"_id": "n1", "grid": [[1, 2], [3, 4]]})
    with pytest.raises(ValueError, match="nested arrays"):
        await coll.insert({"_id": "n2", "deep": {"rows": [{"ok": [1]}, [2]]}})
    assert await coll.count({}) == 0
    # arrays of documents holding arrays are fine
    await coll.insert({"_id": "n3", "rows": [{"cells": [1, 2]}, {"cells": [3]}]})
    assert await coll.find_one({"rows.cells": 3}) is not None
    with pytest.raises(ValueError, match="nested arrays"):
        await coll.update({"_id": "n3"}, set_fields={"grid": [[0]]})
    with pytest.raises(ValueError, match="nested arrays"):
        await coll.update({"_id": "n3"}, add_to_set={"rows": [1]})
    assert await coll.get("n3") == {"_id": "n3", "rows": [{"cells": [1, 2]}, {"cells": [3]}]}


async def test_collections_are_separate(document_env):
    one = document_env.store.collection("one")
    two = document_env.store.collection("two")
    await one.insert({"_id": "x", "in": "one"})
    await two.insert({"_id": "x", "in": "two"})
    assert (await one.get("x"))["in"] == "one"
    assert (await two.get("x"))["in"] == "two"
