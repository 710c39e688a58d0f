"""Benchmark: Tessera's Deep Zoom pyramid build against ``vips dzsave`` on the same slide.

Usage::

    .venv/bin/python scripts/bench_tiling.py [--width 35900 --height 29950] [--repeat 1]
    .venv/bin/python scripts/bench_tiling.py --memory-check   # 100,000 x 100,000 px, RSS only

The slide is generated once and cached under ``.tessera/cache/bench/`` (``$TESSERA_HOME`` if
set): an Aperio-like SVS (levels at downsample 1, 4 and 16, sizes rounded down as Aperio does,
240x240 tiles) whose JPEG tiles are real tiles of ``CMU-1-Small-Region.svs`` (OpenSlide test
data) picked at random and written pre-compressed with tifffile (RGB JPEG with shared
JPEGTables, like the scanner's). Default 35,900 x 29,950 px = 1.075 gigapixel.

Each build runs in its own child process from the same input, and writes a DZI layout
(``slide.dzi`` + ``slide_files/``) to the same file system:

* ``tessera``: the tiling engine as the tiling stage runs it (tile size = the source tile size,
  no overlap: full tiles are copied, the rest decoded/re-encoded at JPEG Q 90 4:2:0);
* ``tessera-254``: the engine with tile size 254 / overlap 1 (nothing can be copied: every tile
  is re-encoded), for a like-for-like re-encode comparison;
* ``vips``: ``vips dzsave`` with the same tile size / overlap as ``tessera`` and
  ``.jpeg[Q=90,subsample_mode=on]`` (4:2:0, as Pillow); ``vips-254`` likewise for
  ``tessera-254``. vips picks its ``openslideload`` loader for an SVS (its ``tiffload`` cannot
  be forced from the command line: blocking openslideload makes the load fail).

Wall time is measured by the parent around the child (process start included); CPU time is
the child's user + system time (``wait4``), telling on a loaded machine. Peak memory
is the peak of the summed RSS of the child's whole process tree, polled from /proc every 50 ms
(``ru_maxrss`` of RUSAGE_CHILDREN is printed too: it is the largest single process).
``vips`` is installed with apt-get (Debian's libvips-tools) when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "slides" / "aperio" / "CMU-1-Small-Region.svs"
TARGET_RATIO = 0.8
TILE = 240
QUALITY = 90


def bench_dir() -> Path:
    home = Path(os.environ.get("TESSERA_HOME") or ROOT / ".tessera")
    return home / "cache" / "bench"


# --- slide generation --------------------------------------------------------------------------
def _cmu_tiles() -> tuple[list[bytes], bytes]:
    import tifffile

    with tifffile.TiffFile(SAMPLE) as tf:
        page = tf.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        fh = tf.filehandle
        tiles: list[bytes] = []
        for off, cnt in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(off)
            tiles.append(fh.read(cnt))
        return tiles, page.jpegtables or b""


def _synthetic_tiles() -> tuple[list[bytes], bytes]:
    """Sixteen smooth 240x240 RGB tiles (cheap to decode) for the memory check."""
    import tifffile

    tmp = bench_dir() / "synthetic-tiles.tif"
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    arrays = []
    for k in range(16):
        r = (xx * (k + 1)) % 256
        g = (yy * (16 - k)) % 256
        b = ((xx + yy) // 2 + 16 * k) % 256
        arrays.append(np.dstack([r, g, b]).astype(np.uint8))
    mosaic = np.concatenate(arrays, axis=1)
    tifffile.imwrite(
        tmp, mosaic, tile=(TILE, TILE), compression="jpeg", compressionargs={"level": 60},
        photometric="rgb", metadata=None,
    )  # fmt: skip
    with tifffile.TiffFile(tmp) as tf:
        page = tf.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        fh = tf.filehandle
        out: list[bytes] = []
        for off, cnt in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(off)
            out.append(fh.read(cnt))
        tables = page.jpegtables or b""
    tmp.unlink()
    return out, tables


def generate(path: Path, width: int, height: int, synthetic: bool = False) -> None:
    """Aperio-like SVS: levels at downsample 1, 4, 16 (Aperio rounds sizes down)."""
    import tifffile

    tiles, tables = _synthetic_tiles() if synthetic else _cmu_tiles()
    rng = np.random.default_rng(11)
    header = "Aperio Image Library v12.0.5 \r\n"
    fields = "|AppMag = 20|StripeWidth = 2040|MPP = 0.4990"
    tmp = path.with_name(path.name + ".partial")

    def stream(count: int):
        for i in rng.integers(0, len(tiles), size=count).tolist():
            yield tiles[i]

    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for ds in (1, 4, 16):
            w, h = width // ds, height // ds
            n = -(-w // TILE) * -(-h // TILE)
            desc = f"{header}{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE})"
            if ds > 1:
                desc += f" -> {w}x{h}"
            tw.write(
                stream(n),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="jpeg",
                photometric="rgb",
                subsampling=(1, 1),
                compressionargs={"outcolorspace": "RGB"},  # RGB-coded JPEG, as Aperio
                jpegtables=tables,
                description=f"{desc} JPEG/RGB Q=70{fields}",
                metadata=None,
            )
    os.replace(tmp, path)


# --- steps (each run in a child process) -------------------------------------------------------
_TESSERA = r"""
import json, sys, time
from pathlib import Path
from services.tiling.engine.pyramid import open_tiff_pyramid
src, out, tile, overlap, pool, workers, sink = sys.argv[1:8]
t0 = time.perf_counter()
builder = open_tiff_pyramid(
    src, tile_size=None if tile == "auto" else int(tile), overlap=int(overlap),
    jpeg_quality=90, workers=int(workers) or None, pool=pool,
)
assert builder is not None, "not a tiled-JPEG TIFF"
root = Path(out)
files = root / "slide_files"
count = nbytes = 0
with builder:
    if sink == "fs":
        for level in range(builder.level_count):
            (files / str(level)).mkdir(parents=True, exist_ok=True)
    for t in builder.iter_tiles():
        count += 1
        nbytes += len(t.data)
        if sink == "fs":
            (files / str(t.level) / f"{t.col}_{t.row}.jpeg").write_bytes(t.data)
    if sink == "fs":
        (root / "slide.dzi").write_text(builder.descriptor())
    failed = len(builder.failed_tiles())
    copied = builder.copied
    geometry = builder.geometry
print(json.dumps({
    "inner": time.perf_counter() - t0, "tiles": count, "bytes": nbytes, "copied": copied,
    "failed": failed, "tile_size": geometry.tile_size, "overlap": geometry.overlap,
}))
"""


def _tree_rss(pid: int) -> int:
    """Summed RSS (bytes) of ``pid`` and all its descendants (via /proc/*/task/*/children,
    so a poll costs a few reads, not a scan of every process)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * page
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    stack.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            continue
    return total


def run_child(cmd: list[str]) -> tuple[float, int, float, str]:
    """(wall seconds, peak tree RSS bytes, CPU seconds, stdout) of one child process. CPU is
    user + system of the child and its waited-for descendants (``wait4``)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        peak = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {stderr[-2000:]}")
    return wall, peak, usage.ru_utime + usage.ru_stime, stdout


def ensure_vips() -> str:
    """Path of ``vips``; installs Debian's libvips-tools with apt-get when it is missing."""
    found = shutil.which("vips")
    if found:
        return found
    print("vips not found: apt-get install libvips-tools ...", flush=True)
    apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "-n", "apt-get"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*apt, "update", "-q"], check=True, env=env)
    subprocess.run([*apt, "install", "-y", "-q", "libvips-tools"], check=True, env=env)
    found = shutil.which("vips")
    if not found:
        raise SystemExit("vips is still missing after installing libvips-tools")
    return found


def count_tiles(out: Path) -> int:
    return sum(
        sum(1 for f in files if f.endswith(".jpeg")) for _, _, files in os.walk(out / "slide_files")
    )


def step(name: str, src: Path, out: Path, args: argparse.Namespace, vips: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    tile, overlap = ("auto", "0") if not name.endswith("-254") else ("254", "1")
    if name.startswith("tessera"):
        cmd = [sys.executable, "-c", _TESSERA, str(src), str(out), tile, overlap]
        cmd += [args.pool, str(args.workers), args.sink]
        wall, peak, cpu, stdout = run_child(cmd)
        info = json.loads(stdout.strip().splitlines()[-1])
    else:
        size, ov = (str(TILE), "0") if tile == "auto" else ("254", "1")
        cmd = [vips, "dzsave", str(src), str(out / "slide"), "--tile-size", size]
        cmd += ["--overlap", ov, "--suffix", f".jpeg[Q={QUALITY},subsample_mode=on]"]
        wall, peak, cpu, _ = run_child(cmd)
        info = {"tiles": count_tiles(out), "tile_size": int(size), "overlap": int(ov)}
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    info.update(wall=wall, peak=peak, cpu=cpu, maxrss=max(after, before) * 1024)
    if args.sink == "fs" and name.startswith("tessera"):
        info["tiles_on_disk"] = count_tiles(out)
    shutil.rmtree(out, ignore_errors=True)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=35900)
    ap.add_argument("--height", type=int, default=29950)
    ap.add_argument("--repeat", type=int, default=1, help="runs per step (median reported)")
    ap.add_argument("--pool", choices=["thread", "process"], default="thread")
    ap.add_argument("--workers", type=int, default=0, help="0: one per core")
    ap.add_argument("--steps", default="tessera,vips,tessera-254,vips-254")
    ap.add_argument("--sink", choices=["fs", "null"], default="fs")
    ap.add_argument("--memory-check", action="store_true", help="100k x 100k px, tessera only")
    ap.add_argument("--regenerate", action="store_true", help="ignore the cached slide")
    args = ap.parse_args(argv)
    if args.memory_check:
        args.width = args.height = 100_000
        args.steps, args.sink = "tessera", "null"

    cache = bench_dir()
    cache.mkdir(parents=True, exist_ok=True)
    kind = "synthetic" if args.memory_check else "cmu1"
    src = cache / f"bench-tiling-{kind}-{args.width}x{args.height}.svs"
    if args.regenerate or not src.is_file():
        t0 = time.perf_counter()
        print(f"generating {src} ...", flush=True)
        generate(src, args.width, args.height, synthetic=args.memory_check)
        print(f"  generated in {time.perf_counter() - t0:.1f} s", flush=True)
    steps = [s for s in args.steps.split(",") if s]
    vips = ensure_vips() if any(s.startswith("vips") for s in steps) else ""
    gpx = args.width * args.height / 1e9
    print(
        f"source: {src.name}, {src.stat().st_size / 1e6:.0f} MB, {gpx:.3f} gigapixel, "
        f"{os.cpu_count()} cores, pool={args.pool}",
        flush=True,
    )
    with open(src, "rb") as fh:  # warm the page cache for every step alike
        while fh.read(64 << 20):
            pass
    out = cache / "out-tiling"
    results: dict[str, list[dict]] = {s: [] for s in steps}
    for _ in range(args.repeat):
        for name in steps:
            results[name].append(step(name, src, out, args, vips))
            r = results[name][-1]
            print(f"  {name}: {r['wall']:.1f} s, {r['peak'] / 1e6:.0f} MB", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print()
    print(
        f"{'step':<16}{'tile/ovl':>9}{'wall s':>9}{'CPU s':>8}{'peak RSS MB':>13}"
        f"{'maxrss MB':>11}{'tiles':>9}{'copied':>9}{'failed':>8}"
    )
    for name in steps:
        last = results[name][-1]
        print(
            f"{name:<16}{last['tile_size']:>5}/{last['overlap']:<3}{med(name, 'wall'):>9.2f}"
            f"{med(name, 'cpu'):>8.1f}"
            f"{max(r['peak'] for r in results[name]) / 1e6:>13.0f}"
            f"{max(r['maxrss'] for r in results[name]) / 1e6:>11.0f}{last['tiles']:>9}"
            f"{last.get('copied', '-')!s:>9}{last.get('failed', '-')!s:>8}"
        )
    print()
    if "tessera" in results and "vips" in results:
        ratio = med("tessera", "wall") / med("vips", "wall")
        cpu_ratio = med("tessera", "cpu") / med("vips", "cpu")
        verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
        print(
            f"tessera / vips dzsave wall = {ratio:.2f} (target <= {TARGET_RATIO}: {verdict}), "
            f"CPU = {cpu_ratio:.2f}; same tile size/overlap ({TILE}/0), JPEG Q {QUALITY} 4:2:0 "
            "for re-encoded tiles"
        )
    if "tessera-254" in results and "vips-254" in results:
        ratio = med("tessera-254", "wall") / med("vips-254", "wall")
        cpu_ratio = med("tessera-254", "cpu") / med("vips-254", "cpu")
        print(
            f"tessera-254 / vips-254 wall = {ratio:.2f}, CPU = {cpu_ratio:.2f} "
            "(254/1: every tile re-encoded by both)"
        )
    print(
        f"median of {args.repeat} run(s); wall includes process start; peak RSS = summed RSS "
        "of the process tree (polled /proc); maxrss = largest single process"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
