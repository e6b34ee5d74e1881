"""A text8-format corpus built from public-domain text: lowercase a-z words and single spaces, one line.

text8 (mattmahoney.net) cannot be downloaded here, so the tests and the scale measurements (docs/history.md) use a
stand-in of the same format: words drawn independently from the word frequencies of a source text (by
default the Wind in the Willows excerpt in tests/data), written in blocks so a 100 MB file never sits in
memory. The same words, seed and size give the same bytes.

    python tests/text8.py /tmp/text8 --megabytes 100          # one-line file named text8
    python tests/text8.py /tmp/text8.zip --megabytes 100      # the real text8.zip layout: one member "text8"
"""

from __future__ import annotations

import argparse
import re
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

WILLOWS = Path(__file__).resolve().parent / "data" / "wind_in_the_willows_excerpt.txt"


def text8_words(text: str) -> tuple[list[str], np.ndarray]:
    """The distinct words of `text` after text8's normalisation (lowercase, every non-letter a space), with
    their relative frequencies."""
    counts = Counter(re.sub(r"[^a-z]+", " ", text.lower()).split())
    words = sorted(counts)
    frequencies = np.array([counts[w] for w in words], dtype=np.float64)
    return words, frequencies / frequencies.sum()


def text8_blocks(num_chars: int, source: str | None = None, seed: int = 0, block_words: int = 1 << 16):
    """Yields str blocks whose concatenation is one line of exactly num_chars characters: words drawn from
    the source's word frequencies, each preceded by one space (text8 itself starts with a space)."""
    words, probabilities = text8_words(source if source is not None else WILLOWS.read_text(encoding="utf-8"))
    rng = np.random.default_rng(seed)
    written = 0
    while written < num_chars:
        picks = rng.choice(len(words), size=block_words, p=probabilities)
        block = "".join(" " + words[i] for i in picks)[: num_chars - written]
        written += len(block)
        yield block


def write_text8(path: Path, num_chars: int, seed: int = 0, source: str | None = None) -> Path:
    """Write a text8-format line of num_chars characters to `path`; a .zip path gets one member named text8
    (the layout of text8.zip)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".zip":
        with (
            zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive,
            archive.open("text8", "w", force_zip64=True) as member,
        ):
            for block in text8_blocks(num_chars, source, seed):
                member.write(block.encode("ascii"))
    else:
        with open(path, "w", encoding="ascii", newline="") as f:
            for block in text8_blocks(num_chars, source, seed):
                f.write(block)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output file (a .zip gets the text8.zip layout)")
    parser.add_argument("--megabytes", type=float, default=100.0, help="size of the text in 10^6 characters")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_text8(args.out, int(args.megabytes * 1_000_000), args.seed))
