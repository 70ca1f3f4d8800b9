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


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smear.pipeline.cli", "-q", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def test_killed_run_resumes_with_every_record_once_and_the_same_outputs(tmp_path):
    """SIGKILL mid-batch, then --resume: each field once, in input order, byte for byte an uninterrupted run's."""
    import shutil
    import signal
    import time

    inputs = tmp_path / "in"
    for i in range(4):
        for sample in sorted(SAMPLES.glob("*.jpg")):
            (inputs / f"s{i % 2}").mkdir(parents=True, exist_ok=True)
            shutil.copy(sample, inputs / f"s{i % 2}" / f"{i}-{sample.name}")
    full = _run("analyze", str(inputs), "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "smear.pipeline.cli", "-q", "analyze", str(inputs), "--output",
                             str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        results = cut / "results.jsonl"
        if results.exists() and results.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = (cut / "results.jsonl").read_bytes()
    assert 4 <= written.count(b"\n") < 12, "the run was not killed mid-batch"

    again = _run("analyze", str(inputs), "--output", str(cut))
    assert again.returncode == 1 and "--resume" in again.stderr  # a previous run is never silently replaced

    resumed = _run("analyze", str(inputs), "--output", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    kept = int(resumed.stderr.split("resumed: ")[1].split(" of ")[0])
    assert kept >= 4
    images = [json.loads(line)["image"] for line in (cut / "results.jsonl").read_text().splitlines()]
    assert len(images) == len(set(images)) == 12
    for name in ("results.jsonl", "summary.csv", "slides.json", "slides.csv"):
        assert (cut / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    assert sorted(p.name for p in (cut / "overlays").iterdir()) == sorted(p.name for p in (tmp_path / "full" / "overlays").iterdir())
    assert not (cut / "results.previous.jsonl").exists()
    assert "<html" in (cut / "report.html").read_text()
