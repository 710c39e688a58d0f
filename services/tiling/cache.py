"""In-process caches of the tile read path, and their Prometheus metrics.

* `TileCache`: an LRU of encoded tiles (and composed IIIF images) bounded by total bytes
  (`TESSERA_TILING__CACHE_BYTES`). Each entry keeps its ETag so a hit costs no hashing.
* `TtlCache`: a small map whose entries expire after a fixed time and whose size is bounded;
  the stage keeps the pyramid records of tiled slides in one, so a tile read does not cost a
  document-store round trip.

Metrics are read from the caches when Prometheus scrapes (`CacheCollector`), so the counters on
`/metrics` and the counters the tests read are the same numbers. Labels are cache names only.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from services.shared.access import DecisionCache

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class CachedBlob:
    data: bytes
    etag: str


def etag_of(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


class TileCache:
    """LRU of encoded tiles bounded by total bytes. One entry may take at most 1/8 of the
    budget, so a few large composed images cannot flush every hot tile."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max(0, max_bytes)
        self._size = 0
        self._items: OrderedDict[str, CachedBlob] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def max_bytes(self) -> int:
        return self._max

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> CachedBlob | None:
        blob = self._items.get(key)
        if blob is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return blob

    def put(self, key: str, data: bytes) -> CachedBlob:
        """Remember `data` under `key` (when it fits) and return it with its ETag."""
        blob = CachedBlob(data, etag_of(data))
        if len(data) > self._max // 8:
            return blob
        old = self._items.pop(key, None)
        if old is not None:
            self._size -= len(old.data)
        self._items[key] = blob
        self._size += len(data)
        while self._size > self._max:
            _, evicted = self._items.popitem(last=False)
            self._size -= len(evicted.data)
            self.evictions += 1
        return blob

    def drop_prefix(self, prefix: str) -> None:
        for key in [k for k in self._items if k.startswith(prefix)]:
            self._size -= len(self._items.pop(key).data)


class TtlCache(Generic[K, V]):
    """Entries live `ttl_s` seconds; at most `max_entries` (oldest dropped first). A TTL of 0
    disables the cache (every `get` misses, `put` stores nothing)."""

    def __init__(
        self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_s
        self._max = max(1, max_entries)
        self._clock = clock
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            del self._items[key]
            return None
        return item[1]

    def put(self, key: K, value: V) -> None:
        if self._ttl <= 0:
            return
        self._items.pop(key, None)
        self._items[key] = (self._clock() + self._ttl, value)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class CacheCollector(Collector):
    """Exposes the tile cache and the access-decision cache of the running stage."""

    def __init__(self) -> None:
        self._tiles: TileCache | None = None
        self._decisions: DecisionCache | None = None

    def watch(self, tiles: TileCache, decisions: DecisionCache) -> None:
        self._tiles = tiles
        self._decisions = decisions

    def collect(self) -> Iterator[Metric]:
        t = self._tiles
        if t is not None:
            lookups = CounterMetricFamily(
                "tessera_tiling_tile_cache_lookups",
                "Tile cache lookups by outcome",
                labels=["outcome"],
            )
            lookups.add_metric(["hit"], t.hits)
            lookups.add_metric(["miss"], t.misses)
            yield lookups
            yield CounterMetricFamily(
                "tessera_tiling_tile_cache_evictions", "Tiles evicted", value=t.evictions
            )
            yield GaugeMetricFamily(
                "tessera_tiling_tile_cache_bytes",
                "Bytes held by the tile cache",
                value=t.size_bytes,
            )
            yield GaugeMetricFamily(
                "tessera_tiling_tile_cache_max_bytes", "Tile cache budget", value=t.max_bytes
            )
            yield GaugeMetricFamily(
                "tessera_tiling_tile_cache_entries", "Tiles held by the tile cache", value=len(t)
            )
        d = self._decisions
        if d is not None:
            decisions = CounterMetricFamily(
                "tessera_tiling_access_cache_lookups",
                "Access decisions answered from the cache (hit) or asked of access control",
                labels=["outcome"],
            )
            decisions.add_metric(["hit"], d.hits)
            decisions.add_metric(["miss"], d.misses)
            yield decisions


CACHE_METRICS = CacheCollector()
REGISTRY.register(CACHE_METRICS)
