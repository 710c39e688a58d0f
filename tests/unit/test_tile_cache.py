"""Tile cache (LRU bounded in bytes), TTL map, the access-decision cache and their metrics."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from services.shared.access import Action, DecisionCache, StaticAccessChecker
from services.shared.auth import TokenIssuer, TokenVerifier, generate_keypair
from services.shared.errors import PermissionDenied, Unauthenticated
from services.tiling.cache import CACHE_METRICS, TileCache, TtlCache, etag_of

READ = int(Action.ACTION_READ_PIXELS)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lru_is_bounded_in_bytes_and_counts() -> None:
    cache = TileCache(8 * 100)
    for i in range(10):
        cache.put(f"k{i}", bytes([i]) * 100)
    assert cache.size_bytes <= 800 and len(cache) == 8
    assert cache.evictions == 2
    assert cache.get("k0") is None and cache.get("k1") is None
    hit = cache.get("k9")
    assert hit is not None and hit.data == bytes([9]) * 100 and hit.etag == etag_of(hit.data)
    assert (cache.hits, cache.misses) == (1, 2)
    # a get refreshes recency: k2 survives the next eviction, k3 goes
    assert cache.get("k2") is not None
    cache.put("k10", b"x" * 100)
    assert cache.get("k2") is not None and cache.get("k3") is None


def test_oversized_entries_are_not_kept_and_replacing_keeps_size_right() -> None:
    cache = TileCache(800)
    blob = cache.put("big", b"x" * 101)  # more than 1/8 of the budget
    assert blob.data == b"x" * 101 and len(cache) == 0
    cache.put("a", b"1" * 50)
    cache.put("a", b"2" * 70)
    assert cache.size_bytes == 70
    cache.put("slides/s1/a", b"1" * 10)
    cache.put("slides/s2/a", b"1" * 10)
    cache.drop_prefix("slides/s1/")
    assert cache.size_bytes == 80 and cache.get("slides/s2/a") is not None


def test_ttl_cache_expires_and_is_bounded() -> None:
    clock = Clock()
    ttl: TtlCache[str, int] = TtlCache(10, 3, clock)
    for i in range(4):
        ttl.put(f"k{i}", i)
    assert ttl.get("k0") is None and ttl.get("k3") == 3 and len(ttl) == 3
    clock.now += 10
    assert ttl.get("k3") is None
    off: TtlCache[str, int] = TtlCache(0, 3, clock)
    off.put("k", 1)
    assert off.get("k") is None


async def test_decision_cache_reuses_allows_for_the_window_only() -> None:
    clock = Clock()
    checker = StaticAccessChecker({("ann", "ds"): {READ}}, {"ds"})
    cache = DecisionCache(checker, ttl_s=30, clock=clock)
    for _ in range(5):
        await cache.require("ann", READ, "ds", "slide-1", "slide/slide-1/view")
    assert len(checker.calls) == 1 and (cache.hits, cache.misses) == (4, 1)
    assert checker.calls[0][3] == "slide/slide-1/view"
    # another slide of the same dataset is its own window (its own audit record)
    await cache.require("ann", READ, "ds", "slide-2", "slide/slide-2/view")
    assert len(checker.calls) == 2
    # revocation takes effect once the window is over, never later
    checker.allowed.clear()
    await cache.require("ann", READ, "ds", "slide-1", "slide/slide-1/view")
    clock.now += 30
    with pytest.raises(PermissionDenied):
        await cache.require("ann", READ, "ds", "slide-1", "slide/slide-1/view")


async def test_denials_are_never_cached() -> None:
    checker = StaticAccessChecker({}, {"ds"})
    cache = DecisionCache(checker, ttl_s=30)
    for _ in range(3):
        with pytest.raises(PermissionDenied):
            await cache.require("bob", READ, "ds", "slide-1", "slide/slide-1/view")
    assert len(checker.calls) == 3
    checker.allowed[("bob", "ds")] = {READ}
    await cache.require("bob", READ, "ds", "slide-1", "slide/slide-1/view")


async def test_concurrent_misses_share_one_check() -> None:
    checker = StaticAccessChecker({("ann", "ds"): {READ}}, {"ds"})
    gate = asyncio.Event()
    inner = checker.check

    async def slow(*args: object, **kwargs: object) -> object:
        await gate.wait()
        return await inner(*args, **kwargs)  # type: ignore[arg-type]

    checker.check = slow  # type: ignore[method-assign]
    cache = DecisionCache(checker, ttl_s=30)
    tasks = [
        asyncio.create_task(cache.require("ann", READ, "ds", "s", "slide/s/view"))
        for _ in range(20)
    ]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    assert len(checker.calls) == 1


async def test_ttl_zero_asks_every_time() -> None:
    checker = StaticAccessChecker({("ann", "ds"): {READ}}, {"ds"})
    cache = DecisionCache(checker, ttl_s=0)
    for _ in range(3):
        await cache.require("ann", READ, "ds", "s", "slide/s/tile/0/0_0")
    assert len(checker.calls) == 3


def test_metrics_are_the_cache_counters() -> None:
    tiles = TileCache(1000)
    decisions = DecisionCache(StaticAccessChecker({}, set()), ttl_s=1)
    CACHE_METRICS.watch(tiles, decisions)
    tiles.put("a", b"x" * 40)
    tiles.get("a")
    tiles.get("b")
    tiles.get("c")
    decisions.hits, decisions.misses = 5, 2

    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    assert value("tessera_tiling_tile_cache_lookups_total", outcome="hit") == 1
    assert value("tessera_tiling_tile_cache_lookups_total", outcome="miss") == 2
    assert value("tessera_tiling_tile_cache_bytes") == 40
    assert value("tessera_tiling_tile_cache_max_bytes") == 1000
    assert value("tessera_tiling_tile_cache_entries") == 1
    assert value("tessera_tiling_access_cache_lookups_total", outcome="hit") == 5
    assert value("tessera_tiling_access_cache_lookups_total", outcome="miss") == 2


def test_verified_tokens_are_remembered_until_they_expire() -> None:
    private, public = generate_keypair()
    issuer = TokenIssuer(private)
    verifier = TokenVerifier(public, "tessera", "tessera", cache_size=2)
    token = issuer.issue("ann")
    assert verifier.verify(token).subject == "ann"
    assert verifier.verify(token).subject == "ann"
    expired = issuer.issue("bob", ttl_s=-5)
    with pytest.raises(Unauthenticated):
        verifier.verify(expired)
    with pytest.raises(Unauthenticated):
        verifier.verify(token[:-4] + "AAAA")
    for name in ("c", "d", "e"):
        verifier.verify(issuer.issue(name))
    assert verifier.verify(token).subject == "ann"  # re-verified after being dropped


async def test_concurrent_refusals_are_each_asked_and_audited() -> None:
    checker = StaticAccessChecker({}, {"ds"})
    gate = asyncio.Event()
    inner = checker.check

    async def slow(*args: object, **kwargs: object) -> object:
        await gate.wait()
        return await inner(*args, **kwargs)  # type: ignore[arg-type]

    checker.check = slow  # type: ignore[method-assign]
    cache = DecisionCache(checker, ttl_s=30)
    tasks = [
        asyncio.create_task(cache.require("bob", READ, "ds", "s", "slide/s/view")) for _ in range(3)
    ]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, PermissionDenied) for r in results)
    assert len(checker.calls) == 3
