"""Long fuzzing run: `make test-fuzz` (FUZZ_EXAMPLES cases in total, default 10,000, split
evenly over the targets; FUZZ_TARGETS=a,b to run some). Prints the counts per target and
every finding; exits 1 when there is one. Findings are kept under FUZZ_FINDINGS."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz.harness import TARGETS, Runner, Tally, build_seeds, findings_dir, fuzz


def table(tallies: list[Tally]) -> str:
    head = (
        f"{'target':<14}{'cases':>7}{'ok':>7}{'domain':>8}{'bug':>5}{'hang':>6}{'crash':>6}"
        f"{'slowest s':>11}  top outcomes"
    )
    lines = [head, "-" * len(head)]
    for t in tallies:
        top = ", ".join(f"{k} {n}" for k, n in t.labels.most_common(4))
        lines.append(
            f"{t.target:<14}{t.cases:>7}{t.kinds['ok']:>7}{t.kinds['domain']:>8}"
            f"{t.kinds['bug']:>5}{t.kinds['hang']:>6}{t.kinds['crash']:>6}"
            f"{t.slowest_s:>11.2f}  {top}"
        )
    total = sum(t.cases for t in tallies)
    bad = sum(t.bad for t in tallies)
    lines.append("-" * len(head))
    lines.append(f"{'total':<14}{total:>7}   findings: {bad}")
    return "\n".join(lines)


def main() -> int:
    total = int(os.environ.get("FUZZ_EXAMPLES", "10000"))
    names = [n for n in os.environ.get("FUZZ_TARGETS", "").split(",") if n] or list(TARGETS)
    per = max(1, total // len(names))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tessera-fuzz-seeds-") as tmp:
        seeds = build_seeds(Path(tmp))
        runner = Runner(seeds)
        tallies = []
        try:
            for name in names:
                t0 = time.monotonic()
                tally = fuzz(name, per, runner, seeds, derandomize=False)
                tallies.append(tally)
                print(
                    f"{name}: {tally.cases} cases in {time.monotonic() - t0:.0f} s, "
                    f"{tally.bad} findings",
                    flush=True,
                )
        finally:
            runner.close()
    print()
    print(table(tallies))
    print(f"\n{time.monotonic() - started:.0f} s in all")
    findings = [f for t in tallies for f in t.findings]
    for f in findings:
        print(f"FINDING {f['target']} {f['kind']} {f['label']} ({f['seed']}): {f['detail']}")
    if findings:
        print(f"inputs kept in {findings_dir()}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
