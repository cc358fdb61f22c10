"""Migration over TCP through the real commands: peers authenticate with a shared key before
anything is allocated; a peer with the wrong key is refused (and told so), and incoming goes
on listening for the right one."""

from __future__ import annotations

import os
from pathlib import Path

from cli_procs import Host, hosts, json_lines, one_line, run

_ = hosts  # the fixture


def _key(path: Path, text: str) -> str:
    path.write_text(text)
    os.chmod(path, 0o600)
    return str(path)


def test_precopy_over_tcp_with_a_shared_key(tmp_path: Path, hosts: list[Host]) -> None:
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    key = _key(tmp_path / "key", "8f1e0c2a9b7d4e6f8a1b3c5d7e9f0a2b\n")
    wrong = _key(tmp_path / "wrong", "00000000000000000000000000000000\n")
    workload = Host("workload", "--size", "16M", "--dirty-rate", "16M", "--control", a)
    hosts.append(workload)
    workload.wait_for("ready")
    incoming = Host("incoming", "--listen", "tcp:127.0.0.1:0", "--control", b, "--key-file", key)
    hosts.append(incoming)
    listening = incoming.wait_for("listening")
    to = listening["listen"]
    assert to.startswith("tcp:127.0.0.1:") and not to.endswith(":0")  # the port it bound

    out = run(
        "migrate", "--control", a, "--to", to, "--mode", "precopy", "--key-file", wrong, "--json"
    )
    assert out.returncode == 1, out.stderr
    line = one_line(out.stderr)
    assert "PeerRejected" in line and "the guest runs on the source" in line, line
    assert run("verify", "--control", a).returncode == 0

    out = run(
        "migrate", "--control", a, "--to", to, "--mode", "precopy", "--key-file", key, "--json"
    )
    assert out.returncode == 0, out.stderr
    done = json_lines(out.stdout)[-1]
    assert done["event"] == "done" and done["digest"] == "verified", done
    assert workload.finish() == 0
    incoming.wait_for("running")
    assert run("verify", "--control", b).returncode == 0
    assert run("stop", "--control", b).returncode == 0
    assert incoming.finish() == 0
