"""Port: object storage (S3 in production, through the `minio` SDK)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    etag: str
    content_type: str


class ObjectNotFound(Exception):
    """The bucket or key does not exist."""


class ObjectStore(abc.ABC):
    @abc.abstractmethod
    async def ensure_bucket(self, bucket: str) -> None: ...

    @abc.abstractmethod
    async def put_bytes(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> ObjectInfo: ...

    @abc.abstractmethod
    async def put_file(
        self, bucket: str, key: str, path: Path, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        """Upload a local file, streaming (multipart for large files)."""

    @abc.abstractmethod
    async def get_bytes(self, bucket: str, key: str) -> bytes:
        """Whole object in memory; for small objects (tiles, descriptors, models)."""

    @abc.abstractmethod
    async def get_range(self, bucket: str, key: str, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    async def download_file(self, bucket: str, key: str, path: Path) -> ObjectInfo:
        """Stream the object to a local file."""

    @abc.abstractmethod
    async def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        """Object info, or None when the key does not exist."""

    @abc.abstractmethod
    async def delete(self, bucket: str, key: str) -> None:
        """Delete; deleting a missing key is not an error."""

    @abc.abstractmethod
    async def list_keys(self, bucket: str, prefix: str = "") -> list[str]: ...

    async def delete_prefix(self, bucket: str, prefix: str) -> int:
        keys = await self.list_keys(bucket, prefix)
        for key in keys:
            await self.delete(bucket, key)
        return len(keys)
