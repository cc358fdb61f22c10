"""Run the handoff benchmark from a source checkout: ``python benchmarks/handoff.py --size 1G``.

A thin runner: it calls the same command as ``pageflip bench handoff`` (all options are the
same), so results from either are the same kind. ``--render FILE.json ...`` prints saved
results as the Markdown tables that docs/benchmarks.md shows, without running anything.
"""

from __future__ import annotations

import json
import sys

from pageflip.bench.handoff import markdown_table
from pageflip.cli import main


def render(paths: list[str]) -> None:
    """Print the Markdown tables of saved JSON results, one after another."""
    for path in paths:
        with open(path) as f:
            sys.stdout.write(markdown_table(json.load(f)) + "\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--render"]:
        render(args[1:])
    else:
        main(["bench", "handoff", *args], prog_name="pageflip")
