"""``smear review``: a local page to check every call of an analysis folder, correct it and sign a slide off.

FastAPI (optional extra ``smear[review]``). The API (``docs/review.md``):

- ``GET /api/slides``: each slide's ``slide`` (name), ``status`` (new, in review, signed off), counts of cells;
- ``GET /api/slides/{slide}/cells``: each cell's ``id``, image, box, group, label, score, ``review``,
  ``below_threshold`` (scored under the detector's threshold and kept: a WBC on the classifier's word, ``wbc_rescue``,
  or an RBC over red-cell pixels no other box covered, ``rbc_rescue``), ``corrected_label``;
- ``GET /api/slides/{slide}/summary``: counts, differential and flags from the corrected calls;
- ``POST /api/cells/{id}`` ``{"label": "Lymphocyte"}`` (or ``{"label": null}``: accept the call): 200, the cell;
  an unknown label: 422; a signed-off slide: 409;
- ``POST /api/slides/{slide}/signoff`` ``{"reviewer": "..."}``: writes ``OUT/reviewed/{slide}.json``;
- ``GET /api/cells/{id}/crop.png`` and ``GET /api/fields/{field}/overlay.png``: images cut from or stored in
  ``OUT`` only (anything resolving outside it is a 404).

Security: with a token (required off the loopback address) every request needs it, as the ``X-Smear-Token``
header or a ``token`` query parameter, else 401; request bodies over ``MAX_BODY_BYTES`` get 413; the framework's
documentation pages are off; the page's assets ship in the package (no CDN, no web fonts).
"""

# No "from __future__ import annotations": FastAPI reads the request models of the routes below from their
# annotations, which must be the classes themselves (they are local to create_app).
import functools
import hmac
from pathlib import Path

from smear.data.taxonomy import CELL_CLASSES

from .store import REVIEW_LABELS, ReviewStore

MAX_BODY_BYTES = 16 * 1024
CROP_PX = 112
CROP_MARGIN = 0.25
STATIC = Path(__file__).resolve().parent / "static"
#: The page's reclassification keys: 1-9, then 0 for "WBC, subtype unsure"
KEY_LABELS = ("Neutrophil", "Eosinophil", "Lymphocyte", "Monocyte", "Basophil", "ImmatureGranulocyte",
              "Erythroblast", "Platelets", "RBC", "WBC")
assert set(KEY_LABELS) == set(REVIEW_LABELS) and set(CELL_CLASSES) < set(KEY_LABELS)


def inside(root: Path, path: Path) -> Path | None:
    """``path`` resolved, if it lies inside ``root`` (symlinks followed), else None."""
    try:
        p = path.resolve()
    except OSError:
        return None
    return p if p.is_relative_to(root) and p.is_file() else None


def create_app(out: Path, token: str | None = None):
    """The FastAPI app serving the review of analysis folder ``out``."""
    import cv2
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from pydantic import BaseModel, Field

    store = ReviewStore(out)
    root = store.out
    app = FastAPI(title="smear review", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None:
            given = request.headers.get("x-smear-token") or request.query_params.get("token") or ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "missing or wrong token"}, status_code=401)
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "Content-Length required"}, status_code=411)
            if int(length) > MAX_BODY_BYTES:
                return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
        response = await call_next(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    class LabelIn(BaseModel):
        label: str | None = Field(default=None, max_length=64)

    class SignOffIn(BaseModel):
        reviewer: str = Field(min_length=1, max_length=200)

    def slide_or_404(slide: str) -> dict:
        s = store.slide(slide)
        if s is None:
            raise HTTPException(404, f"no slide {slide!r}")
        return s

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    def static(name: str):
        path = inside(STATIC, STATIC / name)
        if path is None:
            raise HTTPException(404)
        return FileResponse(path)

    @app.get("/api/labels")
    def labels():
        return {"labels": list(KEY_LABELS), "keys": {str((i + 1) % 10): lab for i, lab in enumerate(KEY_LABELS)}}

    @app.get("/api/slides")
    def slides():
        return store.slides()

    @app.get("/api/slides/{slide}/cells")
    def cells(slide: str):
        slide_or_404(slide)
        return [{k: c[k] for k in ("id", "field", "image", "box", "group", "label", "score", "score_in_group",
                                   "review", "below_threshold", "corrected_label", "accepted", "final_label")}
                for c in store.cells(slide)]

    @app.get("/api/slides/{slide}/summary")
    def summary(slide: str):
        return {**slide_or_404(slide), **store.summary(slide)}

    @app.post("/api/cells/{cell_id}")
    def correct(cell_id: int, body: LabelIn):
        try:
            return store.correct(cell_id, body.label)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        except KeyError:
            raise HTTPException(404, f"no cell {cell_id}") from None
        except PermissionError as e:
            raise HTTPException(409, str(e)) from None

    @app.post("/api/slides/{slide}/signoff")
    def signoff(slide: str, body: SignOffIn):
        slide_or_404(slide)
        return store.sign_off(slide, body.reviewer.strip())

    @functools.lru_cache(maxsize=16)
    def field_image(field: int):
        f = store.field(field)
        path = inside(root, root / "fields" / f["file"]) if f and f["file"] else None
        return None if path is None else cv2.imread(str(path), cv2.IMREAD_COLOR)

    @app.get("/api/cells/{cell_id}/crop.png")
    def crop(cell_id: int):
        from smear.data.crops import crop_cell

        c = store.cell(cell_id)
        img = field_image(c["field"]) if c else None
        if img is None:
            raise HTTPException(404, "no such cell, or its field is not in the analysis folder's fields/")
        ok, buf = cv2.imencode(".png", crop_cell(img, c["box"], CROP_MARGIN, CROP_PX))
        if not ok:
            raise HTTPException(500, "the crop could not be encoded")
        return Response(buf.tobytes(), media_type="image/png")

    @app.get("/api/fields/{field}/overlay.png")
    def overlay(field: int):
        f = store.field(field)
        path = inside(root, root / "overlays" / f["overlay"]) if f and f["overlay"] else None
        if path is None:
            raise HTTPException(404, "no overlay for this field in the analysis folder")
        return FileResponse(path, media_type="image/png")

    @app.get("/api/fields/{field}")
    def field_info(field: int):
        f = store.field(field)
        if f is None:
            raise HTTPException(404)
        return {k: f[k] for k in ("field", "slide", "width", "height")} | {"image": Path(f["image"]).name}

    return app
