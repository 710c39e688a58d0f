"""ObjectStore over S3, through the (synchronous) `minio` SDK.

Every SDK call runs in a worker thread (`asyncio.to_thread`) so the event loop never blocks
on the network or the disk. Large files go up as multipart uploads of 16 MiB parts.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from services.shared.ports.objects import ObjectInfo, ObjectNotFound, ObjectStore

__all__ = ["PART_SIZE", "S3ObjectStore"]

PART_SIZE = 16 * 1024 * 1024
_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket"})
_BUCKET_EXISTS = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})

T = TypeVar("T")


def _etag(value: str | None) -> str:
    return (value or "").strip('"')


class S3ObjectStore(ObjectStore):
    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool = False,
        region: str = "us-east-1",
        part_size: int = PART_SIZE,
    ) -> None:
        if part_size < 5 * 1024 * 1024:
            raise ValueError("S3 multipart parts must be at least 5 MiB")
        self.endpoint = endpoint
        self.region = region
        self.part_size = part_size
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
        )

    async def _call(self, bucket: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run a blocking SDK call in a thread, mapping "not found" errors to ObjectNotFound."""
        try:
            return await asyncio.to_thread(fn)
        except S3Error as exc:
            if exc.code in _NOT_FOUND:
                where = bucket if key is None else f"{bucket}/{key}"
                raise ObjectNotFound(f"{where}: {exc.code}") from exc
            raise

    async def ensure_bucket(self, bucket: str) -> None:
        def create() -> None:
            if self._client.bucket_exists(bucket):
                return
            try:
                self._client.make_bucket(bucket, location=self.region)
            except S3Error as exc:
                if exc.code not in _BUCKET_EXISTS:
                    raise

        await asyncio.to_thread(create)

    async def put_bytes(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        payload = bytes(data)
        result = await self._call(
            bucket,
            key,
            lambda: self._client.put_object(
                bucket,
                key,
                io.BytesIO(payload),
                len(payload),
                content_type=content_type,
                part_size=self.part_size,
            ),
        )
        return ObjectInfo(bucket, key, len(payload), _etag(result.etag), content_type)

    async def put_file(
        self, bucket: str, key: str, path: Path, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        file_path = os.fspath(path)

        def upload() -> tuple[str, int]:
            size = os.path.getsize(file_path)
            result = self._client.fput_object(
                bucket, key, file_path, content_type=content_type, part_size=self.part_size
            )
            return _etag(result.etag), size

        etag, size = await self._call(bucket, key, upload)
        return ObjectInfo(bucket, key, size, etag, content_type)

    def _read(self, bucket: str, key: str, offset: int = 0, length: int = 0) -> bytes:
        response = self._client.get_object(bucket, key, offset=offset, length=length)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    async def get_bytes(self, bucket: str, key: str) -> bytes:
        return await self._call(bucket, key, lambda: self._read(bucket, key))

    async def get_range(self, bucket: str, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        if length == 0:
            # minio reads "length 0" as "to the end"; an empty range still needs the object
            if await self.stat(bucket, key) is None:
                raise ObjectNotFound(f"{bucket}/{key}")
            return b""
        return await self._call(
            bucket, key, lambda: self._read(bucket, key, offset=offset, length=length)
        )

    async def download_file(self, bucket: str, key: str, path: Path) -> ObjectInfo:
        file_path = os.fspath(path)
        stat = await self._call(
            bucket, key, lambda: self._client.fget_object(bucket, key, file_path)
        )
        return ObjectInfo(
            bucket,
            key,
            int(stat.size or 0),
            _etag(stat.etag),
            stat.content_type or "application/octet-stream",
        )

    async def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            stat = await self._call(bucket, key, lambda: self._client.stat_object(bucket, key))
        except ObjectNotFound:
            return None
        return ObjectInfo(
            bucket,
            key,
            int(stat.size or 0),
            _etag(stat.etag),
            stat.content_type or "application/octet-stream",
        )

    async def delete(self, bucket: str, key: str) -> None:
        try:
            await self._call(bucket, key, lambda: self._client.remove_object(bucket, key))
        except ObjectNotFound as exc:
            if isinstance(exc.__cause__, S3Error) and exc.__cause__.code == "NoSuchBucket":
                raise
            # a missing key is not an error

    async def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        def listing() -> list[str]:
            objects = self._client.list_objects(bucket, prefix=prefix or None, recursive=True)
            return sorted(o.object_name for o in objects if o.object_name and not o.is_dir)

        return await self._call(bucket, None, listing)

    async def delete_prefix(self, bucket: str, prefix: str) -> int:
        """Batch delete (DeleteObjects, up to 1000 keys a request) of every key under prefix."""
        keys = await self.list_keys(bucket, prefix)
        if not keys:
            return 0

        def remove() -> list[str]:
            errors = self._client.remove_objects(bucket, (DeleteObject(k) for k in keys))
            # the SDK is lazy: nothing is deleted until the error iterator is consumed
            return [f"{e.name}: {e.code} {e.message}" for e in errors if e.code != "NoSuchKey"]

        failures = await self._call(bucket, None, remove)
        if failures:
            raise RuntimeError(f"could not delete {len(failures)} objects: {failures[:5]}")
        return len(keys)
