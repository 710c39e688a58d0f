"""Short fuzzing run in the normal suite (`pytest tests`): FUZZ_SHORT_EXAMPLES cases per
target (default 30, so about 300 in all), derandomised so CI runs the same cases every time.
The long run is `make test-fuzz` (tests/fuzz/run.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fuzz.harness import TARGETS, Runner, Seed, fuzz

EXAMPLES = int(os.environ.get("FUZZ_SHORT_EXAMPLES", "30"))


def test_seeds_are_valid(seeds: dict[str, Seed], runner: Runner) -> None:
    """Unmutated seeds pass their targets: a mutation's refusal is the mutation's doing."""
    for name, target in TARGETS.items():
        for seed_name in target.seeds:
            out = runner.run(name, seed_name, seeds[seed_name].data)
            assert out.kind == "ok", f"{name} on the unmutated {seed_name}: {out}"


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_short(
    target: str,
    seeds: dict[str, Seed],
    runner: Runner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if "FUZZ_FINDINGS" not in os.environ:
        monkeypatch.setenv("FUZZ_FINDINGS", str(tmp_path / "findings"))
    tally = fuzz(target, EXAMPLES, runner, seeds, derandomize=True)
    assert tally.cases >= EXAMPLES // 2, tally
    assert not tally.findings, "\n".join(
        f"{f['kind']} {f['label']} ({f['seed']}): {f['detail']} mutations={f['mutations']}"
        for f in tally.findings
    )
