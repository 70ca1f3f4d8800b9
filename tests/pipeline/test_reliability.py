"""Reliability of a real run with the shipped models: no network at all, and the same records twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "data" / "samples"

# Every way out to the network raises and is logged: a run must not even try.
NO_NETWORK = r"""
import socket, sys
log = open(sys.argv.pop(1), "a")
def refuse(*args, **kwargs):
    log.write(repr(args[:2]) + "\n"); log.flush()
    raise OSError("network refused by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from smear.pipeline.cli import main
sys.argv[0] = "smear"
main()
"""


def _analyze(out: Path, log: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_NETWORK, str(log), "analyze", str(SAMPLES / "BloodImage_00007.jpg"),
                           str(SAMPLES / "BloodImage_00021.jpg"), "--output", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_analyze_opens_no_connection_and_two_runs_give_identical_records(tmp_path):
    log = tmp_path / "network.log"
    first = _analyze(tmp_path / "a", log)
    assert first.returncode == 0, first.stderr[-2000:]
    second = _analyze(tmp_path / "b", log)
    assert second.returncode == 0, second.stderr[-2000:]
    assert not log.exists() or log.read_text() == ""  # no connection, no name lookup
    for name in ("results.jsonl", "summary.csv", "slides.json", "slides.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    run_a, run_b = (json.loads((tmp_path / d / "run.json").read_text()) for d in "ab")
    run_a.pop("date"), run_b.pop("date")
    assert run_a == run_b  # the run's description differs only in its time
