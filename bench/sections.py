"""BENCHMARKS.md is made of sections, one per benchmark, each between HTML comment markers, so
each benchmark rewrites its own figures and keeps the others'."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = "# Benchmarks\n\nFigures written by `make bench` (code in `bench/`); each section is rewritten by its own benchmark.\n"


def replace_section(path: Path, name: str, markdown: str) -> None:
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    path.write_text(text, encoding="utf-8")
