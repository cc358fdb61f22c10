"""The README's walkthrough, pasted into a shell as it stands (sizes shrunk, paths moved to a
temporary folder): it must work, end every process it started, and leave no socket file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def _walkthrough() -> str:
    text = README.read_text()
    section = text[text.index("## Live migration") :]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no shell block in the README's Live migration section"
    return match.group(1)


def test_the_readme_walkthrough_works_pasted(tmp_path: Path) -> None:
    block = _walkthrough()
    assert block.rstrip().splitlines()[-1].startswith("pageflip stop")  # it ends the guest
    script = block.replace("--size 1G", "--size 16M").replace(
        "--dirty-rate 256M", "--dirty-rate 16M"
    )
    script = script.replace("/tmp/", f"{tmp_path}/")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    # As pasted into an interactive shell: each line in turn, background jobs left to run;
    # `wait` only so that the test sees every process end.
    out = subprocess.run(
        ["bash", "-e", "-c", script + "wait\n"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok: " in out.stdout  # the guest's own check, on the destination
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.glob("*.sock")), list(tmp_path.iterdir())
