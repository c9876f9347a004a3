"""Rewrites one ``## `` section of a Markdown results file, keeping every other section."""
from __future__ import annotations

import os


def write_section(path: str, title: str, lines: list[str]) -> None:
    """Replaces the section starting with the line ``title`` (up to the next ``## `` heading) by
    ``lines`` placed at the end of the file; creates the file if needed."""
    text = open(path).read() if os.path.exists(path) else "# Train-step throughput\n"
    if title in text:
        head, rest = text.split(title, 1)
        tail = rest.split("\n## ", 1)
        text = head + ("" if len(tail) == 1 else "## " + tail[1].rstrip("\n") + "\n\n")
    text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
