"""Vendor OpenSeadragon into the viewer's static folder at build time (`make viewer`).

    python services/tiling/viewer/vendor.py

`npm pack` fetches the pinned package tarball from the npm registry into
$TESSERA_HOME/cache/npm (once), its SHA-512 is checked against the pin below, and the minified
library and its button images are copied to services/tiling/viewer/static/vendor/openseadragon/
(ignored by git). The running service never fetches anything: it serves that folder.
Idempotent: nothing is done when the pinned version is already in place.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "openseadragon"
VERSION = "6.1.1"
# `npm view openseadragon@6.1.1 dist.integrity`
INTEGRITY = "sha512-g4iKe2q8B642SaBT3+x4ZF3/8b1TxPPydyjmtrOLgDrlYWMKd9ZXM+1Cb/xa9DVySkvs/7l6HR1nHKfD5F3Tsw=="  # noqa: E501

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
TARGET = HERE / "static" / "vendor" / PACKAGE
CACHE = Path(os.environ.get("TESSERA_HOME", REPO / ".tessera")) / "cache" / "npm"
_WANTED = ("package/build/openseadragon/openseadragon.min.js", "package/LICENSE.txt")
_IMAGES = "package/build/openseadragon/images/"


def _integrity(path: Path) -> str:
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def fetch() -> Path:
    tarball = CACHE / f"{PACKAGE}-{VERSION}.tgz"
    if tarball.is_file() and _integrity(tarball) == INTEGRITY:
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("npm is needed to vendor OpenSeadragon (apt-get install npm)")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run(
            [npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", tmp, "--silent"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        got = Path(tmp) / tarball.name
        if _integrity(got) != INTEGRITY:
            sys.exit(f"{got.name}: SHA-512 does not match the pinned integrity")
        got.replace(tarball)
    return tarball


def install(tarball: Path) -> None:
    stage = TARGET.with_name(f".{PACKAGE}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "images").mkdir(parents=True)
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            if member.name in _WANTED:
                dest = stage / Path(member.name).name
            elif member.name.startswith(_IMAGES) and member.name.endswith(".png"):
                name = Path(member.name).name
                if "/" in member.name[len(_IMAGES) :]:
                    continue
                dest = stage / "images" / name
            else:
                continue
            src = tar.extractfile(member)
            if src is None:
                continue
            dest.write_bytes(src.read())
    (stage / "VERSION").write_text(f"{VERSION}\n")
    shutil.rmtree(TARGET, ignore_errors=True)
    stage.replace(TARGET)


def main() -> None:
    marker = TARGET / "VERSION"
    if (
        marker.is_file()
        and marker.read_text().strip() == VERSION
        and (TARGET / "openseadragon.min.js").is_file()
    ):
        print(f"{PACKAGE} {VERSION} already vendored in {TARGET.relative_to(REPO)}")
        return
    install(fetch())
    print(f"{PACKAGE} {VERSION} vendored in {TARGET.relative_to(REPO)}")


if __name__ == "__main__":
    main()
