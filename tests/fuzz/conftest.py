"""One set of seed slides and one worker process for every fuzzing test of the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fuzz.harness import Runner, Seed, build_seeds


@pytest.fixture(scope="session")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Seed]:
    return build_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


@pytest.fixture(scope="session")
def runner(seeds: dict[str, Seed]) -> Iterator[Runner]:
    r = Runner(seeds)
    yield r
    r.close()
