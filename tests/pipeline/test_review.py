"""smear review: the API through FastAPI's TestClient, storage that survives a killed server, the token and size
guards, the export; end to end in Debian's chromium driven by Playwright."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import cv2
import pytest
from conftest import draw_field

from smear.pipeline.results import Cell, ImageResult

fastapi = pytest.importorskip("fastapi")  # the 'review' extra (part of the 'test' extra)
from fastapi.testclient import TestClient

from smear.pipeline.review.app import create_app
from smear.pipeline.review.store import ReviewStore

SUBTYPE_OF_FIELD = ("Neutrophil", "Neutrophil", "Eosinophil")


def _cell(label: str, box, score_in_group: float = 0.95) -> Cell:
    from smear.data.taxonomy import group_of

    group = group_of(label)
    return Cell([float(v) for v in box], group, label, 0.9, {"label": group, "score": 0.9},
                {"label": label, "score": 0.9, "label_in_group": label, "score_in_group": score_in_group},
                review=score_in_group < 0.5)


def analysis_folder(root: Path, n_fields: int = 3) -> Path:
    """An analysis folder as 'smear analyze --output' writes it, for drawn fields with known calls (no model)."""
    from smear.pipeline.report import ResultWriter

    inputs = root / "inputs" / "slideA"
    inputs.mkdir(parents=True)
    out = root / "out"
    writer = ResultWriter(out, run_info={"config": {"capture_mode": "wbc-centred"}}, fields=True)
    for i in range(n_fields):
        img, boxes = draw_field(seed=i)
        path = inputs / f"field_{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        cells = [_cell(SUBTYPE_OF_FIELD[i] if lab == "WBC" else lab, b, 0.4 if lab == "WBC" and i == 2 else 0.95)
                 for lab, b in boxes]
        writer.add(ImageResult(image=str(path), width=640, height=480, cells=cells, slide="slideA", rbc_coverage=0.9),
                   img)
    writer.close()
    return out


@pytest.fixture
def out(tmp_path) -> Path:
    return analysis_folder(tmp_path)


def test_slides_cells_and_a_correction_change_the_differential(out):
    client = TestClient(create_app(out))
    (s,) = client.get("/api/slides").json()
    assert (s["slide"], s["status"], s["fields"], s["cells"]) == ("slideA", "new", 3, 45)
    cells = client.get("/api/slides/slideA/cells").json()
    assert {"id", "image", "box", "group", "label", "score", "review", "corrected_label"} <= set(cells[0])
    eos = next(c for c in cells if c["label"] == "Eosinophil")
    assert eos["review"] and eos["corrected_label"] is None
    before = client.get("/api/slides/slideA/summary").json()
    assert before["differential"]["Eosinophil"]["count"] == 1 and before["counts"]["WBC"] == 3
    r = client.post(f"/api/cells/{eos['id']}", json={"label": "Lymphocyte"})
    assert r.status_code == 200 and r.json()["corrected_label"] == "Lymphocyte"
    after = client.get("/api/slides/slideA/summary").json()
    assert after["differential"]["Eosinophil"]["count"] == 0 and after["differential"]["Lymphocyte"]["count"] == 1
    assert after["status"] == "in review"
    assert client.get("/api/slides").json()[0]["corrected"] == 1


def test_a_wbc_kept_under_the_detectors_threshold_says_so(tmp_path):
    from smear.pipeline.report import ResultWriter

    out = tmp_path / "out"
    writer = ResultWriter(out, run_info={"config": {"capture_mode": "wbc-centred"}}, fields=True)
    img, boxes = draw_field(seed=0)
    cells = [_cell("Neutrophil" if lab == "WBC" else lab, b) for lab, b in boxes]
    rescued = _cell("Lymphocyte", [300, 300, 400, 400])
    rescued.review, rescued.detector = True, {"label": "WBC", "score": 0.08, "below_threshold": True}
    writer.add(ImageResult(image=str(tmp_path / "f.png"), width=640, height=480, cells=cells + [rescued],
                           slide="slideA", rbc_coverage=0.9), img)
    writer.close()
    got = TestClient(create_app(out)).get("/api/slides/slideA/cells").json()
    assert [c["label"] for c in got if c["below_threshold"]] == ["Lymphocyte"]
    assert next(c for c in got if c["below_threshold"])["review"] and len(got) == len(cells) + 1


def test_unknown_label_is_422_and_unknown_things_404(out):
    client = TestClient(create_app(out))
    cell = client.get("/api/slides/slideA/cells").json()[0]
    assert client.post(f"/api/cells/{cell['id']}", json={"label": "Blast"}).status_code == 422
    assert client.post(f"/api/cells/{cell['id']}", json={"label": 3}).status_code == 422
    assert client.post("/api/cells/99999", json={"label": "RBC"}).status_code == 404
    assert client.get("/api/slides/nope/cells").status_code == 404
    assert client.get(f"/api/cells/{cell['id']}").status_code in (404, 405)


def test_signoff_writes_the_corrected_slide_with_its_audit_trail(out):
    client = TestClient(create_app(out))
    cells = client.get("/api/slides/slideA/cells").json()
    neut = [c for c in cells if c["label"] == "Neutrophil"]
    client.post(f"/api/cells/{neut[0]['id']}", json={"label": "Monocyte"})
    client.post(f"/api/cells/{neut[1]['id']}", json={"label": None})  # accepted as it stands: no audit row
    r = client.post("/api/slides/slideA/signoff", json={"reviewer": "A. Tech"})
    assert r.status_code == 200
    doc = json.loads((out / "reviewed" / "slideA.json").read_text())
    assert doc["reviewer"] == "A. Tech" and doc["signed_at"]
    assert doc["counts"]["Monocyte"] == 1 and doc["counts"]["Neutrophil"] == 1
    assert doc["differential"]["Monocyte"]["count"] == 1 and "flags" in doc
    (a,) = doc["audit"]
    assert (a["cell"], a["from_label"], a["to_label"], a["reviewer"]) == (neut[0]["id"], "Neutrophil", "Monocyte",
                                                                          "A. Tech")
    assert client.get("/api/slides").json()[0]["status"] == "signed off"
    assert client.post(f"/api/cells/{neut[1]['id']}", json={"label": "RBC"}).status_code == 409
    assert client.post("/api/slides/slideA/signoff", json={"reviewer": ""}).status_code == 422


def test_an_acknowledged_correction_survives_a_new_server_and_two_tabs_lose_nothing(out):
    first = TestClient(create_app(out))
    ids = [c["id"] for c in first.get("/api/slides/slideA/cells").json() if c["group"] == "RBC"][:20]
    second = TestClient(create_app(out))  # another tab (its own connection)
    errors = []

    def correct(client, chunk):
        for i in chunk:
            if client.post(f"/api/cells/{i}", json={"label": "Platelets"}).status_code != 200:
                errors.append(i)

    tabs = [threading.Thread(target=correct, args=(c, ids[k::2])) for k, c in enumerate((first, second))]
    for t in tabs:
        t.start()
    for t in tabs:
        t.join()
    assert not errors
    del first, second  # as if the server were killed: only the database remains
    store = ReviewStore(out)
    assert {c["id"] for c in store.cells("slideA") if c["corrected_label"] == "Platelets"} == set(ids)
    assert len(store.audit("slideA")) == 20
    db = store._db()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_crops_and_fields_come_only_from_inside_the_folder(out, tmp_path):
    client = TestClient(create_app(out))
    cell = client.get("/api/slides/slideA/cells").json()[0]
    r = client.get(f"/api/cells/{cell['id']}/crop.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert cv2.imdecode(__import__("numpy").frombuffer(r.content, "uint8"), cv2.IMREAD_COLOR).shape == (112, 112, 3)
    assert client.get(f"/api/fields/{cell['field']}/overlay.png").status_code == 200
    assert client.get("/static/app.js").status_code == 200
    for bad in ("/static/../store.py", "/static/%2e%2e/store.py", "/static/..%2F..%2Fpyproject.toml"):
        assert client.get(bad).status_code == 404
    # a field replaced by a link to a file outside the folder is not served
    outside = tmp_path / "secret.png"
    shutil.copyfile(next((out / "fields").iterdir()), outside)
    for f in (out / "fields").iterdir():
        f.unlink()
        f.symlink_to(outside)
    fresh = TestClient(create_app(out))
    assert fresh.get(f"/api/cells/{cell['id']}/crop.png").status_code == 404


def test_token_and_body_size_guards(out):
    client = TestClient(create_app(out, token="s3cret"))
    assert client.get("/api/slides").status_code == 401
    assert client.get("/", params={"token": "wrong"}).status_code == 401
    assert client.get("/api/slides", headers={"X-Smear-Token": "s3cret"}).status_code == 200
    assert client.get("/", params={"token": "s3cret"}).status_code == 200
    open_client = TestClient(create_app(out))
    cell = open_client.get("/api/slides/slideA/cells").json()[0]
    big = open_client.post(f"/api/cells/{cell['id']}", content=b'{"label": "' + b"x" * 20000 + b'"}',
                           headers={"Content-Type": "application/json"})
    assert big.status_code == 413
    assert open_client.get("/docs").status_code == 404 and open_client.get("/openapi.json").status_code == 404


def test_export_writes_crops_by_class_and_voc_fields(out, tmp_path):
    from typer.testing import CliRunner

    from smear.pipeline.cli import app

    client = TestClient(create_app(out))
    cells = client.get("/api/slides/slideA/cells").json()
    wbc = [c for c in cells if c["group"] == "WBC"]
    client.post(f"/api/cells/{wbc[0]['id']}", json={"label": "Lymphocyte"})
    res = CliRunner().invoke(app, ["review", str(out), "--export", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.output
    assert "exported 1 cells (Lymphocyte 1)" in res.output  # only what a person checked, slide not signed off
    (crop,) = (tmp_path / "exp" / "lymphocyte").glob("*.png")
    assert cv2.imread(str(crop)).shape == (128, 128, 3)
    xml = sorted((tmp_path / "exp" / "voc").glob("*.xml"))
    assert len(xml) == 3 and "<name>Lymphocyte</name>" in "".join(x.read_text() for x in xml)
    client.post("/api/slides/slideA/signoff", json={"reviewer": "me"})
    res = CliRunner().invoke(app, ["review", str(out), "--export", str(tmp_path / "exp2")])
    assert "exported 45 cells" in res.output  # a signed-off slide: every cell, checked as a whole


def test_review_of_a_folder_without_results_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from smear.pipeline.cli import app

    res = CliRunner().invoke(app, ["review", str(tmp_path), "--no-browser"])
    assert res.exit_code != 0 and "results.jsonl" in str(res.exception or res.output)


# ---------------------------------------------------------------- end to end in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def server(out):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(out), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(5)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_technologist_reclassifies_by_keyboard_and_signs_off_in_chromium(server, out):
    from urllib.parse import urlparse

    sync_api = pytest.importorskip("playwright.sync_api")
    elsewhere = []

    def only_loopback(route):
        host = urlparse(route.request.url).hostname
        if host not in ("127.0.0.1", "localhost"):
            elsewhere.append(route.request.url)
            return route.abort()
        return route.continue_()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.route("**/*", only_loopback)
        page.goto(server)
        page.click("tr.slide[data-slide='slideA']")
        page.wait_for_selector(".tile.sel")
        # WBC classes come first and the doubtful call (the eosinophil, review: true) leads its class
        first = page.locator(".tile").first
        assert first.get_attribute("data-label") == "Neutrophil"
        page.wait_for_function("document.querySelector('#differential tr[data-class=Lymphocyte] .pct')"
                               " && document.querySelector('#differential tr[data-class=Lymphocyte] .pct')"
                               ".textContent.startsWith('0%')")
        page.keyboard.press("3")  # Lymphocyte
        page.wait_for_function("document.querySelector('#differential tr[data-class=Lymphocyte] .pct')"
                               ".textContent.startsWith('33.3%')")
        assert "was Neutrophil" in first.inner_text()
        page.keyboard.press("ArrowLeft")  # back to the first cell, then accept the next one with Enter
        page.keyboard.press("ArrowRight")
        page.keyboard.press("Enter")
        page.fill("#reviewer", "A. Tech")
        page.click("#signoff button")
        page.wait_for_function("document.querySelector('#signed').textContent.includes('Signed off by A. Tech')")
        browser.close()
    assert elsewhere == []
    doc = json.loads((out / "reviewed" / "slideA.json").read_text())
    assert doc["counts"]["Lymphocyte"] == 1 and doc["counts"]["Neutrophil"] == 1
    assert [(a["from_label"], a["to_label"]) for a in doc["audit"]] == [("Neutrophil", "Lymphocyte")]


def test_a_correction_acknowledged_before_sigkill_is_kept(out):
    """The real server process, killed with SIGKILL right after a 200: the correction is on disk."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from smear.pipeline.cli import main; main()", "review", str(out),
                             "--no-browser", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                cells = httpx.get(f"{base}/api/slides/slideA/cells", timeout=1).json()
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("the review server did not start: " + proc.stdout.read1().decode())
        target = next(c for c in cells if c["label"] == "Eosinophil")
        assert httpx.post(f"{base}/api/cells/{target['id']}", json={"label": "Basophil"}).status_code == 200
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ReviewStore(out).cell(target["id"])["corrected_label"] == "Basophil"
