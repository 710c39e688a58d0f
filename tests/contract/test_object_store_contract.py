"""Contract of the ObjectStore port (services/shared/ports/objects.py).

Runs against InMemoryObjectStore and S3ObjectStore (the `object_env` fixture, conftest.py).
"""

from __future__ import annotations

import hashlib
import os

import pytest

from services.shared.ports.objects import ObjectInfo, ObjectNotFound

MiB = 1024 * 1024


async def test_put_and_get_bytes(object_env):
    store, bucket = object_env.store, object_env.bucket
    info = await store.put_bytes(bucket, "tiles/0/0_0.jpeg", b"\xff\xd8jpeg", "image/jpeg")
    assert info.bucket == bucket
    assert info.key == "tiles/0/0_0.jpeg"
    assert info.size == 6
    assert info.content_type == "image/jpeg"
    assert info.etag
    assert await store.get_bytes(bucket, "tiles/0/0_0.jpeg") == b"\xff\xd8jpeg"

    stat = await store.stat(bucket, "tiles/0/0_0.jpeg")
    assert stat == ObjectInfo(bucket, "tiles/0/0_0.jpeg", 6, info.etag, "image/jpeg")

    # overwrite replaces; empty objects are fine
    await store.put_bytes(bucket, "tiles/0/0_0.jpeg", b"new")
    assert await store.get_bytes(bucket, "tiles/0/0_0.jpeg") == b"new"
    stat = await store.stat(bucket, "tiles/0/0_0.jpeg")
    assert stat is not None
    assert stat.content_type == "application/octet-stream"
    await store.put_bytes(bucket, "empty", b"")
    assert await store.get_bytes(bucket, "empty") == b""
    empty = await store.stat(bucket, "empty")
    assert empty is not None
    assert empty.size == 0


async def test_put_file_and_download_file_multipart(object_env, tmp_path):
    store, bucket = object_env.store, object_env.bucket
    source = tmp_path / "slide.svs"
    data = os.urandom(40 * MiB + 12345)  # > 2 parts of 16 MiB
    source.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()

    info = await store.put_file(bucket, "raw/slide.svs", source, "image/tiff")
    assert info.size == len(data)
    assert info.content_type == "image/tiff"

    stat = await store.stat(bucket, "raw/slide.svs")
    assert stat is not None
    assert stat.size == len(data)
    assert stat.etag == info.etag
    assert stat.content_type == "image/tiff"

    target = tmp_path / "out" / "copy.svs"
    got = await store.download_file(bucket, "raw/slide.svs", target)
    assert got.size == len(data)
    assert got.etag == info.etag
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
    # no temporary files left next to the target
    assert [p.name for p in target.parent.iterdir()] == ["copy.svs"]

    # a range across the first part boundary
    offset = 16 * MiB - 100
    assert (
        await store.get_range(bucket, "raw/slide.svs", offset, 300) == data[offset : offset + 300]
    )


async def test_get_range(object_env):
    store, bucket = object_env.store, object_env.bucket
    data = bytes(range(256)) * 4
    await store.put_bytes(bucket, "blob", data)
    assert await store.get_range(bucket, "blob", 0, 10) == data[:10]
    assert await store.get_range(bucket, "blob", 100, 28) == data[100:128]
    assert await store.get_range(bucket, "blob", len(data) - 5, 5) == data[-5:]
    # a range running past the end is cut at the end
    assert await store.get_range(bucket, "blob", len(data) - 3, 100) == data[-3:]
    assert await store.get_range(bucket, "blob", 7, 0) == b""
    with pytest.raises(ObjectNotFound):
        await store.get_range(bucket, "missing", 0, 10)


async def test_stat_of_a_missing_key_is_none(object_env):
    assert await object_env.store.stat(object_env.bucket, "no/such/key") is None


async def test_get_of_a_missing_key_or_bucket_raises(object_env, tmp_path):
    store, bucket = object_env.store, object_env.bucket
    with pytest.raises(ObjectNotFound):
        await store.get_bytes(bucket, "no/such/key")
    with pytest.raises(ObjectNotFound):
        await store.download_file(bucket, "no/such/key", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ObjectNotFound):
        await store.get_bytes(bucket + "-missing", "key")
    with pytest.raises(ObjectNotFound):
        await store.put_bytes(bucket + "-missing", "key", b"x")
    with pytest.raises(ObjectNotFound):
        await store.list_keys(bucket + "-missing")


async def test_delete_is_idempotent(object_env):
    store, bucket = object_env.store, object_env.bucket
    await store.put_bytes(bucket, "a/b", b"1")
    await store.delete(bucket, "a/b")
    assert await store.stat(bucket, "a/b") is None
    await store.delete(bucket, "a/b")  # already gone: fine
    await store.delete(bucket, "never/existed")


async def test_list_keys_with_prefix(object_env):
    store, bucket = object_env.store, object_env.bucket
    keys = ["slides/s1/0.jpeg", "slides/s1/1.jpeg", "slides/s10/0.jpeg", "slides/s2/x/y.bin", "top"]
    for key in keys:
        await store.put_bytes(bucket, key, key.encode())
    assert await store.list_keys(bucket) == sorted(keys)
    assert await store.list_keys(bucket, "slides/s1/") == ["slides/s1/0.jpeg", "slides/s1/1.jpeg"]
    assert await store.list_keys(bucket, "slides/s1") == [
        "slides/s1/0.jpeg",
        "slides/s1/1.jpeg",
        "slides/s10/0.jpeg",
    ]
    assert await store.list_keys(bucket, "slides/s2/") == ["slides/s2/x/y.bin"]
    assert await store.list_keys(bucket, "nothing/") == []


async def test_delete_prefix(object_env):
    store, bucket = object_env.store, object_env.bucket
    for i in range(12):
        await store.put_bytes(bucket, f"tiles/s1/{i}.jpeg", b"x")
    await store.put_bytes(bucket, "tiles/s2/0.jpeg", b"y")
    assert await store.delete_prefix(bucket, "tiles/s1/") == 12
    assert await store.list_keys(bucket) == ["tiles/s2/0.jpeg"]
    assert await store.delete_prefix(bucket, "tiles/s1/") == 0
    assert await store.get_bytes(bucket, "tiles/s2/0.jpeg") == b"y"


async def test_ensure_bucket_is_idempotent(object_env):
    store, bucket = object_env.store, object_env.bucket
    await store.ensure_bucket(bucket)
    await store.put_bytes(bucket, "k", b"v")
    await store.ensure_bucket(bucket)
    assert await store.get_bytes(bucket, "k") == b"v"
