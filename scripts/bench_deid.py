"""Benchmark: de-identification of ~1 GB slides against a plain file copy.

Usage::

    .venv/bin/python scripts/bench_deid.py [--tiles-per-side 330] [--repeat 3]
        [--formats svs,bigtiff] [--regenerate]

The slides are generated once and cached under ``.tessera/cache/bench/`` (``$TESSERA_HOME``
if set): real 240x240 JPEG tiles of ``CMU-1-Small-Region.svs`` (OpenSlide test data) are
repeated into a square pyramid written with tifffile as pre-compressed tiles (no re-encode).

* ``svs``: an Aperio SVS with a thumbnail, a label and a macro, and an ImageDescription
  carrying the usual identifying fields;
* ``bigtiff``: a generic tiled BigTIFF pyramid (64-bit offsets) with an identifying
  ImageDescription, DateTime, Artist and HostComputer, and a stripped label image.

Each step then runs in its own child process, so its wall time, CPU time and peak resident
memory (VmHWM; mapped file pages count too) are its own:

* ``shutil.copyfile`` to a new file and ``cp`` (the baselines),
* ``deidentify`` alone,
* ``deidentify`` + ``verify`` (what the service runs: the verifier re-reads the whole output).

Outputs are written beside the cached slide and deleted after each step. Nothing is written
outside ``.tessera/`` (and the system temp directory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "slides" / "aperio" / "CMU-1-Small-Region.svs"
TARGET_RATIO = 2.0

_IDENTIFYING = (
    "|ScanScope ID = BENCH-SCANNER-1|Filename = BENCH-SLIDE-0001|Date = 11/03/26"
    "|Time = 10:11:12|User = 6a0c9e4e-bench-4c5b-9d7e-000000000001"
)


def bench_dir() -> Path:
    home = Path(os.environ.get("TESSERA_HOME") or ROOT / ".tessera")
    return home / "cache" / "bench"


# --- slide generation --------------------------------------------------------------------------
def _source_tiles() -> tuple[list[bytes], bytes, dict[str, np.ndarray]]:
    import tifffile

    with tifffile.TiffFile(SAMPLE) as tf:
        page = tf.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        fh = tf.filehandle
        tiles: list[bytes] = []
        for off, cnt in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(off)
            tiles.append(fh.read(cnt))
        tables = page.jpegtables or b""
        images = {
            "thumbnail": np.asarray(tf.pages[1].asarray()),
            "label": np.asarray(tf.pages[2].asarray()),
            "macro": np.asarray(tf.pages[3].asarray()),
        }
    return tiles, tables, images


def generate(path: Path, tiles_per_side: int) -> None:
    """Write the benchmark SVS to ``path`` (via a temporary name, renamed when complete)."""
    import tifffile

    tiles, tables, images = _source_tiles()
    tile = 240
    side0 = tiles_per_side * tile
    header = "Aperio Image Library v11.2.1 \r\n"
    fields = f"|AppMag = 20|StripeWidth = 2040{_IDENTIFYING}|MPP = 0.4990"
    levels: list[int] = []
    n = tiles_per_side
    while True:
        levels.append(n)
        if n <= 8:
            break
        n = (n + 1) // 2
    tmp = path.with_name(path.name + ".partial")
    rng = np.random.default_rng(7)

    def stream(count: int) -> Iterator[bytes]:
        picks = rng.integers(0, len(tiles), size=count)
        for i in picks.tolist():
            yield tiles[i]

    with tifffile.TiffWriter(tmp, bigtiff=False) as tw:
        for i, n_tiles in enumerate(levels):
            side = n_tiles * tile
            if i == 0:
                desc = f"{header}{side0}x{side0} [0,0 {side0}x{side0}] (240x240) JPEG/RGB Q=30"
            else:
                desc = (
                    f"{header}{side0}x{side0} [0,0 {side0}x{side0}] (240x240) -> "
                    f"{side}x{side} JPEG/RGB Q=30"
                )
            tw.write(
                stream(n_tiles * n_tiles),
                shape=(side, side, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                jpegtables=tables,
                description=desc + fields,
                metadata=None,
            )
            if i == 0:
                thumb = np.ascontiguousarray(images["thumbnail"][:574, :574])
                tw.write(
                    thumb,
                    compression="jpeg",
                    compressionargs={"level": 80},
                    photometric="rgb",
                    description=f"{header[:-2]}\n{side0}x{side0} -> 574x574 - {fields}",
                    metadata=None,
                )
        label, macro = images["label"], images["macro"]
        tw.write(
            label,
            compression="lzw",
            photometric="rgb",
            subfiletype=1,
            description=f"{header[:-2]}\nlabel {label.shape[1]}x{label.shape[0]}",
            metadata=None,
        )
        tw.write(
            macro,
            compression="jpeg",
            compressionargs={"level": 80},
            photometric="rgb",
            subfiletype=9,
            description=f"{header[:-2]}\nmacro {macro.shape[1]}x{macro.shape[0]}",
            metadata=None,
        )
    os.replace(tmp, path)


def generate_bigtiff(path: Path, tiles_per_side: int) -> None:
    """A generic tiled BigTIFF pyramid of the same tiles, with identifying baseline tags."""
    import tifffile

    tiles, tables, images = _source_tiles()
    tile = 240
    levels: list[int] = []
    n = tiles_per_side
    while True:
        levels.append(n)
        if n <= 8:
            break
        n = (n + 1) // 2
    tmp = path.with_name(path.name + ".partial")
    rng = np.random.default_rng(11)

    def stream(count: int) -> Iterator[bytes]:
        for i in rng.integers(0, len(tiles), size=count).tolist():
            yield tiles[i]

    person = [(315, "s", 0, "Dr. BENCH-PATHOLOGIST", True), (316, "s", 0, "BENCH-HOST-7", True)]
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, n_tiles in enumerate(levels):
            side = n_tiles * tile
            tw.write(
                stream(n_tiles * n_tiles),
                shape=(side, side, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                jpegtables=tables,
                subfiletype=0 if i == 0 else 1,
                description=f"case BENCH-CASE-0002 {_IDENTIFYING}" if i == 0 else None,
                datetime="2026:03:11 10:11:12" if i == 0 else None,
                extratags=person if i == 0 else (),
                metadata=None,
            )
        label = images["label"]
        tw.write(label, compression="lzw", photometric="rgb", subfiletype=1, metadata=None)
    os.replace(tmp, path)


GENERATORS = {
    "svs": (generate, "svs", "APERIO_SVS"),
    "bigtiff": (generate_bigtiff, "tiff", "GENERIC_TIFF"),
}


# --- steps (each run in a child process) -------------------------------------------------------
_CHILD = r"""
import json, os, shutil, subprocess, sys, time
from pathlib import Path
step, src, dst, fmt_name = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
if step.startswith("deid"):
    import openslide, tifffile  # imported before timing, as in a running service
    from services.deid.engine import deidentify, verify
    from services.shared.pseudonym import Pseudonymizer
    from services.shared.wsi.sniff import SlideFormat
t0 = time.perf_counter()
c0 = os.times()
if step == "copyfile":
    shutil.copyfile(src, dst)
elif step == "cp":
    subprocess.run(["cp", str(src), str(dst)], check=True)
else:
    fmt = SlideFormat[fmt_name]
    report = deidentify(src, dst, fmt, Pseudonymizer(b"b" * 32, "bench"))
    if step == "deid+verify":
        verify(dst, fmt, report.identifying_values)
wall = time.perf_counter() - t0
c1 = os.times()
cpu = (c1.user - c0.user) + (c1.system - c0.system)
cpu += (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
hwm = 0
with open("/proc/self/status") as fh:
    for line in fh:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
if step == "cp":
    import resource
    hwm = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"wall": wall, "cpu": cpu, "hwm": hwm, "out": dst.stat().st_size}))
"""


def run_step(step: str, src: Path, out_dir: Path, fmt_name: str) -> dict[str, float]:
    dst = out_dir / f"out-{step.replace('+', '-')}{src.suffix}"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, step, str(src), str(dst), fmt_name],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        dst.unlink(missing_ok=True)


def _warm(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(64 << 20):
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles-per-side", type=int, default=330, help="level-0 tiles per side")
    ap.add_argument("--repeat", type=int, default=3, help="runs per step (median reported)")
    ap.add_argument("--formats", default="svs,bigtiff", help="comma list: svs, bigtiff")
    ap.add_argument("--regenerate", action="store_true", help="ignore the cached slides")
    args = ap.parse_args(argv)

    cache = bench_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out_dir = cache / "out"
    out_dir.mkdir(exist_ok=True)
    steps = ["copyfile", "cp", "deid", "deid+verify"]
    names = {"deid": "deidentify", "deid+verify": "deidentify+verify"}
    summary: list[str] = []
    for kind in [f.strip() for f in args.formats.split(",") if f.strip()]:
        gen, suffix, fmt_name = GENERATORS[kind]
        src = cache / f"bench-{kind}-{args.tiles_per_side}.{suffix}"
        if kind == "svs" and not src.is_file():  # the name used before BigTIFF was added
            old = cache / f"bench-aperio-{args.tiles_per_side}.svs"
            if old.is_file() and not args.regenerate:
                old.rename(src)
        if args.regenerate or not src.is_file():
            t0 = time.perf_counter()
            print(f"generating {src} ...", flush=True)
            gen(src, args.tiles_per_side)
            print(f"  generated in {time.perf_counter() - t0:.1f} s", flush=True)
        size = src.stat().st_size
        _warm(src)
        results: dict[str, list[dict[str, float]]] = {s: [] for s in steps}
        for _ in range(args.repeat):
            for step in steps:
                results[step].append(run_step(step, src, out_dir, fmt_name))

        def med(step: str, key: str, results: dict[str, list[dict[str, float]]] = results) -> float:
            return statistics.median(r[key] for r in results[step])

        copy_time = min(med("copyfile", "wall"), med("cp", "wall"))
        print()
        print(f"{kind}: {src.name}, {size / 1e6:.1f} MB ({fmt_name})")
        print(
            f"{'step':<19}{'wall s':>8}{'min-max s':>13}{'cpu s':>8}{'MB/s':>8}"
            f"{'peak RSS MB':>13}{'x copy':>8}"
        )
        for step in steps:
            walls = [r["wall"] for r in results[step]]
            wall = med(step, "wall")
            print(
                f"{names.get(step, step):<19}{wall:>8.2f}"
                f"{f'{min(walls):.2f}-{max(walls):.2f}':>13}{med(step, 'cpu'):>8.2f}"
                f"{size / 1e6 / wall:>8.0f}{max(r['hwm'] for r in results[step]) / 1e6:>13.1f}"
                f"{wall / copy_time:>8.2f}"
            )
        summary.append(
            f"{kind}: deidentify / copy = {med('deid', 'wall') / copy_time:.2f}, "
            f"deidentify+verify / copy = {med('deid+verify', 'wall') / copy_time:.2f} "
            f"(target <= {TARGET_RATIO})"
        )
    out_dir.rmdir()
    print()
    for line in summary:
        print(line)
    print(
        f"median of {args.repeat} runs (min-max shown); copy = the faster of copyfile and cp; "
        "cpu = user+system seconds of the step (cp: of its child)"
    )
    print("peak RSS: VmHWM of the child process (for cp: ru_maxrss of the cp process)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
