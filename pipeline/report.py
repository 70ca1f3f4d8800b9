"""Views of results: results.jsonl, summary.csv, overlays, a self-contained report.html, stdout tables.

report.html is rendered from the jinja2 templates in ``pipeline/templates`` (autoescaped): ``report.html.j2``
lays out the page around field cards rendered one at a time from ``field.html.j2``.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

import numpy as np

from smear.configs.errors import ImageReadError, SmearError
from smear.data.images import read_bgr
from smear.data.taxonomy import NRBC, SUBTYPES

from .results import ImageResult, SlideResult

# Colours (RGB) per final label, chosen to stay distinct on pink/purple stained fields.
COLOURS = {
    "RBC": (220, 40, 40), "Platelets": (255, 200, 0), "Neutrophil": (0, 90, 255), "Eosinophil": (255, 110, 0),
    "Lymphocyte": (0, 170, 60), "Monocyte": (150, 0, 200), "Basophil": (0, 200, 200),
    "ImmatureGranulocyte": (255, 0, 140), "Erythroblast": (120, 60, 0), "WBC": (40, 40, 40),
}
SEVERITY_CLASS = {"critical": "crit", "warning": "warn"}  # the report's CSS class per flag severity (else "info")


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a killed run never leaves half a file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` only once fully written (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _copy_text(src: IO[str], dst: IO[bytes], chunk_chars: int = 1 << 20) -> None:
    src.seek(0)
    while chunk := src.read(chunk_chars):
        dst.write(chunk.encode())


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


def field_name(result: ImageResult, index: int) -> str:
    """``fields/`` name of a field's copy: the record's index and the input's file name."""
    return f"{index:05d}_{Path(result.image).name}"


@dataclass(frozen=True)
class FieldRendering:
    """A field's pictures for the output folder, made where its image is decoded (the writer itself, or an actor of
    ``--engine ray``, so its driver never decodes a field): the overlay PNG's bytes (None when overlays are off or
    encoding failed), the report's thumbnail of that overlay (base64 JPEG) and the field's WBC gallery crops."""

    overlay_png: bytes | None
    thumb: str | None
    crops: list[dict]


def render_field(image_rgb: np.ndarray, result: ImageResult, overlays: bool = True) -> FieldRendering:
    """Draw and encode a field's overlay (when ``overlays``), its thumbnail and its WBC crops."""
    import cv2

    png = thumb = None
    if overlays:
        overlay = draw_overlay(image_rgb, result)
        ok, buf = cv2.imencode(".png", overlay)
        if ok:
            png, thumb = buf.tobytes(), _thumb_b64(overlay)  # the PNG's exact pixels: no need to read it back
    return FieldRendering(png, thumb, wbc_crops(image_rgb, result))


class ResultWriter:
    """Streams results to the output folder as they come, then writes the summaries.

    Records are appended to ``results.jsonl`` one line at a time (flushed), so an interrupted batch
    keeps everything finished before it. The summary.csv rows and the report's field thumbnails
    are written to unnamed temporary files as they come and assembled by ``close``, so the writer
    keeps no record in memory, however long the batch.
    """

    def __init__(self, out: Path, overlays: bool = True, run_info: dict | None = None, fields: bool = False):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.overlays = overlays
        self.fields = fields  # copy each input (its bytes) to fields/<index>_<name>: the review page's source
        self.run_info = run_info or {}
        if run_info is not None:  # first, so an interrupted batch still says what made its results
            atomic_write_text(self.out / "run.json", json.dumps(run_info, indent=2))
        self._jsonl = open(self.out / "results.jsonl", "w")
        # newline="": csv writes its own \r\n line ends, as write_rows does.
        self._summary_rows = tempfile.TemporaryFile("w+", encoding="utf-8", newline="", dir=self.out)
        self._summary_csv: csv.DictWriter | None = None
        self._report_cards = tempfile.TemporaryFile("w+", encoding="utf-8", newline="", dir=self.out)
        self._wbc_crops = tempfile.TemporaryFile("w+", encoding="utf-8", newline="", dir=self.out)
        self.count = 0
        self.n_failed = 0

    def add(self, result: ImageResult, image: np.ndarray | FieldRendering | None = None) -> None:
        """Write one record; ``image`` is its field (RGB), or that field already rendered (:func:`render_field`),
        for the overlay, the report's thumbnail and the WBC gallery."""
        self._jsonl.write(json.dumps(result.to_dict()) + "\n")
        self._jsonl.flush()
        overlay_path = self.out / "overlays" / overlay_name(result, self.count)
        rendering = None
        if not result.error and image is not None:
            rendering = image if isinstance(image, FieldRendering) else render_field(image, result, self.overlays)
        written = False
        if self.overlays and rendering is not None and rendering.overlay_png is not None:
            atomic_write_bytes(overlay_path, rendering.overlay_png)
            written = True
        if self.fields and not result.error and Path(result.image).is_file():
            (self.out / "fields").mkdir(exist_ok=True)
            shutil.copyfile(result.image, self.out / "fields" / field_name(result, self.count))
        row = result.summary_row()
        if self._summary_csv is None:
            self._summary_csv = csv.DictWriter(self._summary_rows, fieldnames=list(row))
            self._summary_csv.writeheader()
        self._summary_csv.writerow(row)
        thumb = None
        if not result.error:
            thumb = rendering.thumb if written else _thumb_b64(overlay_path)
        link = f"overlays/{overlay_path.name}" if written else None
        self._report_cards.write(json.dumps(field_card(result, thumb, link)) + "\n")  # one card a line
        for crop in rendering.crops if rendering is not None else ():
            self._wbc_crops.write(json.dumps({"slide": result.slide or "", **crop}) + "\n")
        self.n_failed += bool(result.error)
        self.count += 1

    def close(self, results: Sequence[ImageResult] | None = None, slides: Sequence[SlideResult] = ()) -> None:
        """Write summary.csv, slides.json and report.html from the records given to ``add``.

        ``results``, when given, must be those records (nothing more is read from it).
        """
        if results is not None and len(results) != self.count:
            raise SmearError(f"ResultWriter.close got {len(results)} results but add() was given {self.count}; "
                             "pass each result to add() as it comes")
        self._jsonl.close()
        with self._summary_rows, atomic_open(self.out / "summary.csv") as f:
            _copy_text(self._summary_rows, f)
        atomic_write_text(self.out / "slides.json", json.dumps([s.to_dict() for s in slides], indent=2))
        write_rows(self.out / "slides.csv", [slide_row(s) for s in slides])
        with self._wbc_crops:
            self._wbc_crops.seek(0)
            gallery: dict[str, dict[str, list[dict]]] = {}
            for line in self._wbc_crops:
                c = json.loads(line)
                gallery.setdefault(c["slide"], {}).setdefault(c["label"], []).append(c)
        with self._report_cards, atomic_open(self.out / "report.html") as f:
            self._report_cards.seek(0)
            cards = (json.loads(line) for line in self._report_cards)
            for piece in _report_pieces(self.count, self.n_failed, slides, cards, self.run_info, gallery):
                f.write(piece.encode())


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


def _thumb_b64(source: Path | np.ndarray, max_side: int = 320) -> str | None:
    """A JPEG thumbnail, base64, of an image file or a BGR array; None when the file cannot be read."""
    import cv2

    if isinstance(source, Path):
        try:
            img = read_bgr(source)
        except ImageReadError:
            return None
    else:
        img = source
    s = max_side / max(img.shape[:2])
    if s < 1:
        img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return base64.b64encode(buf.tobytes()).decode() if ok else None


@functools.lru_cache(maxsize=1)
def _templates():
    """The jinja2 environment of ``pipeline/templates``: autoescaped, block tags leave no blank lines."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("smear.pipeline", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.globals.update(COLOURS=COLOURS, SUBTYPES=SUBTYPES, SEVERITY_CLASS=SEVERITY_CLASS)
    env.filters["json_except"] = lambda d, *keys: json.dumps({k: v for k, v in d.items() if k not in keys})
    return env


def field_card(result: ImageResult, thumb_b64: str | None, link: str | None = None) -> str:
    """One field's card in the report (HTML): thumbnail (a link to the full-size overlay), name, counts and the
    field's own warnings (or its error). Flags are the slide's, shown once per slide."""
    return _templates().get_template("field.html.j2").render(result=result, name=Path(result.image).name,
                                                             thumb=thumb_b64, link=link)


#: WBC-group cells in the report's gallery: at most this many per class and slide, the least certain first
GALLERY_PER_CLASS = 60
GALLERY_CROP_PX = 72


def wbc_crops(image_rgb: np.ndarray, result: ImageResult) -> list[dict]:
    """Small JPEG crops (base64) of a field's WBC-group cells, for the report's gallery per class."""
    import cv2

    from smear.data.crops import crop_cell

    out = []
    for c in result.cells:
        if c.group != "WBC":
            continue
        crop = cv2.cvtColor(crop_cell(image_rgb, c.box, 0.15, GALLERY_CROP_PX), cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if ok:
            out.append({"label": c.label, "score": c.classifier.get("score_in_group", c.score),
                        "field": Path(result.image).name, "jpeg": base64.b64encode(buf.tobytes()).decode()})
    return out


def slide_row(s: SlideResult) -> dict:
    """One slide's row of ``slides.csv``: fields, counts, ratios, differential percents, RBC coverage, flags."""
    row: dict = {"slide": s.slide, "n_fields": s.n_fields, "n_failed": s.n_failed, "capture_mode": s.capture_mode}
    row.update({f"n_{k}": v for k, v in s.counts.items()})
    row.update({k: "" if v is None else v for k, v in s.ratios.items()})
    for k in SUBTYPES:
        pct = (s.differential.get(k) or {}).get("percent")
        row[f"pct_{k}"] = "" if pct is None else pct
    nrbc = (s.differential.get("nrbc_per_100_wbc") or {}).get("per_100_wbc")
    row["nrbc_per_100_wbc"] = "" if nrbc is None else nrbc
    row["rbc_coverage"] = "" if s.rbc_coverage is None else s.rbc_coverage
    row["flags"] = "; ".join(f"{f.name} ({f.severity})" for f in s.flags)
    return row


def _report_pieces(n_images: int, n_failed: int, slides: Sequence[SlideResult], cards: Iterable[str],
                   run_info: dict | None = None, gallery: dict | None = None) -> Iterator[str]:
    """report.html in pieces as it renders: a header (date, smear version, models), per slide the counts, flags,
    differential, a WBC gallery per class and morphology, then ``cards`` (from :func:`field_card`), read only as
    the page reaches them."""
    from markupsafe import Markup

    run_info = run_info or {}
    models = run_info.get("models") or {}
    header = {"date": run_info.get("date", ""), "smear": run_info.get("smear", ""),
              "commit": run_info.get("commit", ""),
              "models": {k: Path(str((v or {}).get("weights", ""))).name for k, v in models.items()
                         if isinstance(v, dict)}}
    galleries = {}
    for slide, per_label in (gallery or {}).items():
        order = [lab for lab in (*SUBTYPES, NRBC, "WBC") if lab in per_label]
        galleries[slide] = [(lab, len(per_label[lab]), sorted(per_label[lab], key=lambda c: c["score"] or 0)
                             [:GALLERY_PER_CLASS]) for lab in order]
    page = _templates().get_template("report.html.j2")
    return page.generate(n_images=n_images, n_failed=n_failed, slides=slides, header=header, galleries=galleries,
                         cards=(Markup(c) for c in cards))


def render_html(results: list[ImageResult], slides: list[SlideResult], overlay_dir: Path | None,
                run_info: dict | None = None) -> str:
    """The report from the whole list of records (what ``ResultWriter`` streams): per-slide summary, flags with
    evidence, differential chart, WBC gallery (cut from the records' image files), thumbnails."""
    from smear.data.images import read_image

    cards, gallery = [], {}
    for i, r in enumerate(results):
        overlay = overlay_dir / overlay_name(r, i) if overlay_dir and not r.error else None
        has = overlay is not None and overlay.is_file()
        cards.append(field_card(r, _thumb_b64(overlay) if overlay else None,
                                f"overlays/{overlay.name}" if has else None))
        if not r.error and Path(r.image).is_file():
            for c in wbc_crops(read_image(r.image), r):
                gallery.setdefault(r.slide or "", {}).setdefault(c["label"], []).append(c)
    n_fail = sum(1 for r in results if r.error)
    return "".join(_report_pieces(len(results), n_fail, slides, cards, run_info, gallery))


def format_table(results: list[ImageResult]) -> str:
    """A readable per-image table for stdout."""
    name_width = table_name_width(r.image for r in results)
    return "\n".join([table_header(name_width), *(table_row(r, name_width) for r in results)])


_TABLE_COLUMNS = ["RBC", "Platelets", *SUBTYPES, NRBC]


def table_name_width(images: Iterable[str]) -> int:
    """Width of the table's name column for these image paths (known before any is analysed)."""
    return min(40, max([5] + [len(Path(image).name) for image in images]))


def table_header(name_width: int) -> str:
    short = {"Platelets": "PLT", "Neutrophil": "NEU", "Eosinophil": "EOS", "Lymphocyte": "LYM", "Monocyte": "MON",
             "Basophil": "BAS", "ImmatureGranulocyte": "IG", "Erythroblast": "NRBC"}
    return f"{'image':<{name_width}} " + " ".join(f"{short.get(c, c):>5}" for c in _TABLE_COLUMNS) + "  flags"


def table_row(result: ImageResult, name_width: int) -> str:
    """One image's line of ``format_table``."""
    name = Path(result.image).name[:name_width]
    if result.error:
        return f"{name:<{name_width}} ERROR: {result.error}"
    flags = ", ".join(f.name for f in result.flags if f.severity != "insufficient evidence") or "-"
    return f"{name:<{name_width}} " + " ".join(f"{result.counts.get(c, 0):>5}" for c in _TABLE_COLUMNS) + f"  {flags}"
