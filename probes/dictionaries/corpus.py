"""Offline English text for training dictionaries on language models.

`fortunes()` reads the Debian `fortunes` package (apt-get install fortunes: ~1.3 MB of quotations, jokes,
literature and science snippets in /usr/share/games/fortunes, one entry per '%'-separated block; the ASCII-art
files are left out). `debian_docs()` reads the plain-text manuals under /usr/share/doc as a fallback.
"""
from __future__ import annotations

import gzip
import random
from collections.abc import Iterator
from pathlib import Path

from interp.errors import InterpError

FORTUNES = Path("/usr/share/games/fortunes")
SKIP = {"art", "ascii-art", "translate-me"}


class CorpusError(InterpError, FileNotFoundError):
    """The offline text a recipe needs is not installed."""


def fortunes(seed: int = 0, root: Path = FORTUNES) -> list[str]:
    """Every fortune entry (whitespace-normalised), in a seeded shuffled order."""
    files = [p for p in sorted(root.glob("*")) if p.suffix == "" and p.is_file() and p.name not in SKIP] \
        if root.exists() else []
    if not files:
        raise CorpusError(f"no fortune files in {root}: install the Debian package with `apt-get install fortunes`")
    out = []
    for p in files:
        for block in p.read_text(errors="replace").split("\n%\n"):
            text = " ".join(block.split())
            if len(text) > 20:
                out.append(text)
    random.Random(seed).shuffle(out)
    return out


def debian_docs(limit_bytes: int = 20_000_000) -> Iterator[str]:
    """Paragraphs of the plain-text (optionally gzipped) documents under /usr/share/doc."""
    n = 0
    for p in sorted(Path("/usr/share/doc").rglob("*")):
        if not p.is_file() or not (p.name.endswith((".txt", ".txt.gz")) or p.name.startswith("README")):
            continue
        try:
            raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        except OSError:
            continue
        text = raw.decode("utf-8", errors="replace")
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if len(para) > 80:
                n += len(para)
                yield para
        if n > limit_bytes:
            return


__all__ = ["fortunes", "debian_docs", "CorpusError", "FORTUNES"]
