"""Views of results: results.jsonl, summary.csv, overlays, a self-contained report.html, stdout tables."""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from .dataset import SUBTYPES
from .results import ImageResult, SlideResult

# Colours (RGB) per final label, chosen to stay distinct on pink/purple stained fields.
COLOURS = {
    "RBC": (220, 40, 40), "Platelets": (255, 200, 0), "Neutrophil": (0, 90, 255), "Eosinophil": (255, 110, 0),
    "Lymphocyte": (0, 170, 60), "Monocyte": (150, 0, 200), "Basophil": (0, 200, 200), "WBC": (40, 40, 40),
}


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a killed run never leaves half a file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
    os.replace(tmp, path)


def draw_overlay(image_rgb: np.ndarray, result: ImageResult) -> np.ndarray:
    """Boxes coloured by class with legible labels; cells marked for review get a dashed white ring."""
    import cv2

    img = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR).copy()
    h, w = img.shape[:2]
    scale = max(1.0, min(w, h) / 480)  # 1.0 on a 640x480 field, larger on larger images
    thick = max(1, round(scale * 1.5))
    for c in sorted(result.cells, key=lambda c: c.group != "RBC"):  # RBC first, so others stay on top
        x1, y1, x2, y2 = (int(round(v)) for v in c.box)
        colour = COLOURS.get(c.label, (40, 40, 40))[::-1]
        cv2.rectangle(img, (x1, y1), (x2, y2), colour, thick)
        if c.review:
            cv2.rectangle(img, (x1 - 3, y1 - 3), (x2 + 3, y2 + 3), (255, 255, 255), 1)
        text = f"{c.label} {c.score:.2f}" if c.group != "RBC" else "RBC"
        font = 0.5 * scale
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, max(1, thick - 1))
        ty = y1 - 3 if y1 - th - 4 > 0 else min(h - 2, y2 + th + 3)
        x1 = max(0, min(x1, w - tw - 3))  # keep the label inside the image
        cv2.rectangle(img, (x1, ty - th - 2), (x1 + tw + 2, ty + base - 1), colour, -1)
        cv2.putText(img, text, (x1 + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255),
                    max(1, thick - 1), cv2.LINE_AA)
    return img


def overlay_name(result: ImageResult, index: int) -> str:
    stem = Path(result.image).stem
    return f"{index:05d}_{stem}.png"


def write_overlay(path: Path, image_rgb: np.ndarray, result: ImageResult) -> None:
    import cv2

    ok, buf = cv2.imencode(".png", draw_overlay(image_rgb, result))
    if ok:
        atomic_write_bytes(path, buf.tobytes())


class ResultWriter:
    """Streams results to ``results.jsonl`` as they come, then writes the summaries.

    Records are appended one line at a time (flushed), so an interrupted batch keeps
    everything finished before it.
    """

    def __init__(self, out: Path, overlays: bool = True):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.overlays = overlays
        self._jsonl = open(self.out / "results.jsonl", "w")
        self.count = 0

    def add(self, result: ImageResult, image_rgb: np.ndarray | None = None) -> None:
        self._jsonl.write(json.dumps(result.to_dict()) + "\n")
        self._jsonl.flush()
        if self.overlays and image_rgb is not None and not result.error:
            write_overlay(self.out / "overlays" / overlay_name(result, self.count), image_rgb, result)
        self.count += 1

    def close(self, results: list[ImageResult], slides: list[SlideResult]) -> None:
        self._jsonl.close()
        write_summary_csv(self.out / "summary.csv", results)
        atomic_write_text(self.out / "slides.json", json.dumps([s.to_dict() for s in slides], indent=2))
        atomic_write_text(self.out / "report.html", render_html(results, slides, self.out / "overlays"))


def write_rows(path: Path, rows: list[dict]) -> None:
    """A tidy CSV (one dict per row, columns from the first row), written atomically."""
    import io

    buf = io.StringIO()
    if rows:
        wr = csv.DictWriter(buf, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    atomic_write_text(Path(path), buf.getvalue())


def write_summary_csv(path: Path, results: Iterable[ImageResult]) -> None:
    write_rows(path, [r.summary_row() for r in results])


def _thumb_b64(path: Path, max_side: int = 320) -> str | None:
    import cv2

    img = cv2.imread(str(path))
    if img is None:
        return None
    s = max_side / max(img.shape[:2])
    if s < 1:
        img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return base64.b64encode(buf.tobytes()).decode() if ok else None


def _flag_table(flags) -> str:
    if not flags:
        return "<p class='ok'>No flags raised.</p>"
    rows = []
    for f in flags:
        cls = {"critical": "crit", "warning": "warn"}.get(f.severity, "info")
        ev = ", ".join(f"{k}: {v}" for k, v in f.evidence.items())
        observed = html.escape(str(f.observed)) if not isinstance(f.observed, dict) else "<br>".join(
            html.escape(f"{k}: {v}") for k, v in f.observed.items())
        rows.append(f"<tr class='{cls}'><td><b>{html.escape(f.name)}</b></td><td>{html.escape(f.severity)}</td>"
                    f"<td>{html.escape(str(f.rule))}</td><td>{html.escape(str(f.threshold))}</td>"
                    f"<td>{observed}</td>"
                    f"<td>{html.escape(ev)}</td><td>{html.escape(f.caveat)}</td></tr>")
    return ("<table><tr><th>flag</th><th>severity</th><th>rule</th><th>threshold</th><th>observed</th>"
            "<th>evidence</th><th>caveat</th></tr>" + "".join(rows) + "</table>")


def _differential_chart(diff: dict) -> str:
    """Horizontal bars with 95% CI whiskers, as inline SVG (no external resources)."""
    n = diff.get("n_wbc", 0)
    if not n:
        return "<p>No classified WBCs.</p>"
    width, row_h, left = 460, 26, 95
    parts = [f"<svg width='{width + left + 60}' height='{row_h * len(SUBTYPES) + 30}' role='img' "
             f"aria-label='WBC differential'>"]
    for i, s in enumerate(SUBTYPES):
        d = diff[s]
        y = 10 + i * row_h
        pct = d["percent"] or 0
        lo, hi = d["ci95"]
        colour = "rgb(%d,%d,%d)" % COLOURS[s]
        parts.append(f"<text x='0' y='{y + 15}' font-size='13'>{s}</text>")
        parts.append(f"<rect x='{left}' y='{y}' width='{width * pct / 100:.1f}' height='18' fill='{colour}'/>")
        parts.append(f"<line x1='{left + width * lo / 100:.1f}' x2='{left + width * hi / 100:.1f}' y1='{y + 9}' "
                     f"y2='{y + 9}' stroke='black' stroke-width='1.5'/>")
        parts.append(f"<text x='{left + width * max(pct, hi) / 100 + 6:.1f}' y='{y + 14}' font-size='12'>"
                     f"{d['count']} ({pct}%)</text>")
    parts.append(f"<text x='{left}' y='{row_h * len(SUBTYPES) + 25}' font-size='11'>n = {n} WBCs; "
                 f"whiskers: 95% Wilson CI</text></svg>")
    return "".join(parts)


def render_html(results: list[ImageResult], slides: list[SlideResult], overlay_dir: Path | None) -> str:
    """One self-contained page: per-slide summary, flags with evidence, differential chart, thumbnails."""
    css = ("body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}"
           "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}th{background:#f0f0f0}"
           ".crit{background:#fdd}.warn{background:#fff3cd}.info{background:#eef}.ok{color:#070}"
           ".thumbs{display:flex;flex-wrap:wrap;gap:10px}.thumb{font-size:12px;width:330px}.err{color:#b00}"
           ".note{font-size:13px;color:#555}")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>smear report</title><style>{css}</style></head>"
           "<body><h1>smear report</h1><p class='note'>Decision support for trained staff, not a diagnosis. Flags show "
           "their rule, threshold, observed value, evidence and caveat.</p>"]
    n_fail = sum(1 for r in results if r.error)
    out.append(f"<p>{len(results)} images, {len(slides)} slide(s), {n_fail} failed.</p>")
    for s in slides:
        mode_note = (" WBC-centred fields over-represent WBCs, so no WBC count or WBC:RBC flag is raised; the "
                     "differential and the platelet:RBC ratio still apply." if s.capture_mode == "wbc-centred" else "")
        out.append(f"<h2>Slide {html.escape(s.slide)}</h2><p>{s.n_fields} fields; capture mode "
                   f"<b>{html.escape(s.capture_mode)}</b>.{mode_note}</p>")
        c = s.counts
        out.append("<table><tr>" + "".join(f"<th>{k}</th>" for k in c) + "</tr><tr>"
                   + "".join(f"<td>{v}</td>" for v in c.values()) + "</tr></table>")
        out.append("<p>" + "; ".join(f"{k.replace('_', ' ')}: {v if v is not None else 'n/a'}"
                                     for k, v in s.ratios.items()) + "</p>")
        if s.estimates.get("platelets_per_uL") or s.estimates.get("wbc_per_uL"):
            out.append(f"<p>Calibrated estimates: {html.escape(json.dumps({k: v for k, v in s.estimates.items() if k != 'mean_per_field'}))}</p>")
        out.append("<h3>Flags</h3>" + _flag_table(s.flags))
        out.append("<h3>WBC differential</h3>" + _differential_chart(s.differential))
        if s.morphology:
            pct = s.morphology.get("percent", {})
            domain = s.morphology.get("domain") or {}
            if domain.get("in_domain", True):
                out.append("<h3>RBC morphology</h3><table><tr>" + "".join(f"<th>{k}</th>" for k in pct)
                           + "</tr><tr>" + "".join(f"<td>{v}%</td>" for v in pct.values()) + "</tr></table>")
            else:
                out.append("<h3>RBC morphology</h3><p class='note'>Not assessed: these fields are unlike the "
                           f"morphology model's training images (median RBC {domain.get('median_rbc_diameter_px')} px "
                           f"vs {domain.get('model_rbc_diameter_px')} px).</p>")
    out.append("<h2>Fields</h2><div class='thumbs'>")
    for i, r in enumerate(results):
        if r.error:
            out.append(f"<div class='thumb err'><b>{html.escape(Path(r.image).name)}</b><br>{html.escape(r.error)}</div>")
            continue
        b64 = _thumb_b64(overlay_dir / overlay_name(r, i)) if overlay_dir else None
        img = f"<img src='data:image/jpeg;base64,{b64}' width='320'>" if b64 else ""
        counts = ", ".join(f"{k} {v}" for k, v in r.counts.items() if v)
        flags = "".join(f"<br><span class='{ {'critical': 'crit', 'warning': 'warn'}.get(f.severity, 'info') }'>"
                        f"{html.escape(f.name)} ({html.escape(f.severity)})</span>" for f in r.flags)
        out.append(f"<div class='thumb'>{img}<br><b>{html.escape(Path(r.image).name)}</b><br>{html.escape(counts)}{flags}</div>")
    out.append("</div></body></html>")
    return "\n".join(out)


def format_table(results: list[ImageResult]) -> str:
    """A readable per-image table for stdout."""
    cols = ["RBC", "Platelets", *SUBTYPES]
    short = {"Platelets": "PLT", "Neutrophil": "NEU", "Eosinophil": "EOS", "Lymphocyte": "LYM", "Monocyte": "MON",
             "Basophil": "BAS"}
    name_w = min(40, max([5] + [len(Path(r.image).name) for r in results]))
    lines = [f"{'image':<{name_w}} " + " ".join(f"{short.get(c, c):>5}" for c in cols) + "  flags"]
    for r in results:
        name = Path(r.image).name[:name_w]
        if r.error:
            lines.append(f"{name:<{name_w}} ERROR: {r.error}")
            continue
        flags = ", ".join(f.name for f in r.flags if f.severity != "insufficient evidence") or "-"
        lines.append(f"{name:<{name_w}} " + " ".join(f"{r.counts.get(c, 0):>5}" for c in cols) + f"  {flags}")
    return "\n".join(lines)
