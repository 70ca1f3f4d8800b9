"""Reading images of any common format into RGB uint8, and finding image files."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from smear.configs.errors import ImageReadError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3).

    EXIF orientation is honoured; grayscale is expanded, alpha dropped, 16-bit scaled to 8-bit.

    Raises:
        ImageReadError: naming the file and the problem.
    """
    import cv2

    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: file not found")
    if p.is_dir():
        raise ImageReadError(f"{p}: a folder with no images in it (looked for {', '.join(IMAGE_SUFFIXES)})")
    if not p.is_file():
        raise ImageReadError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise ImageReadError(f"{p}: empty file")
    # ANYDEPTH|ANYCOLOR keeps 16-bit data and still applies EXIF orientation (UNCHANGED would not).
    try:
        img = cv2.imread(str(p), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error as e:  # OpenCV refuses a header that claims more pixels than its limit (a decompression bomb)
        if "CV_IO_MAX_IMAGE_PIXELS" in str(e):
            size = image_size(p)
            claimed = f"{size[0]:,} x {size[1]:,} pixels" if size else "more pixels than the limit"
            raise ImageReadError(f"{p}: image too large ({claimed}; OpenCV reads at most "
                                 f"{int(os.environ.get('OPENCV_IO_MAX_IMAGE_PIXELS', 1 << 30)):,}); refused "
                                 "unread") from None
        raise ImageReadError(f"{p}: cannot decode ({str(e).strip().splitlines()[-1]})") from None
    if img is None:
        cut = [w.split(": ", 1)[1].split(" (")[0] for w in file_warnings(p) if "truncated" in w]
        raise ImageReadError(f"{p}: {cut[0]}, cannot be decoded" if cut else
                             f"{p}: cannot decode as an image (supported: {', '.join(IMAGE_SUFFIXES)})")
    if img.dtype == np.uint16:
        img = (img / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        scale = 255.0 if float(np.nanmax(img)) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img) * scale, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def file_warnings(path: str | os.PathLike) -> list[str]:
    """What a record should say about a file that decoded but not whole: a JPEG or PNG cut short (the decoder fills
    the missing rows), a multi-page TIFF (only the first page is analysed)."""
    p = Path(path)
    out: list[str] = []
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError:
        return out
    if head[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in tail:
        out.append(f"{p}: truncated JPEG (no end-of-image marker): the rows after the cut are filled in by the "
                   "decoder, so cells there are missing or false")
    elif head == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail:
        out.append(f"{p}: truncated PNG (no IEND chunk): the rows after the cut are missing or filled in")
    elif head[:4] in (b"II*\x00", b"MM\x00*"):
        try:
            import cv2

            pages = cv2.imcount(str(p))
        except Exception:  # noqa: BLE001  an OpenCV without imcount: say nothing rather than guess
            pages = 1
        if pages > 1:
            out.append(f"{p}: TIFF with {pages} pages: only the first page was analysed")
    return out


def file_sha256(path: str | os.PathLike) -> str | None:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks; None when it cannot be read."""
    from smear.configs.runtime import file_sha256 as sha256

    try:
        return sha256(path)
    except OSError:
        return None


def read_bgr(path: str | os.PathLike) -> np.ndarray:
    """:func:`read_image` in OpenCV's channel order (BGR), for code that hands images to cv2."""
    import cv2

    return cv2.cvtColor(read_image(path), cv2.COLOR_RGB2BGR)


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(width, height)`` as stored (before EXIF orientation), from the header only; None if unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001  any unreadable file: the caller reports it
        return None


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files, folders (recursively, images only, sorted) and globs -> a list of paths in input order.

    A path that matches nothing, and a folder without images, is kept, so it is reported as an error in its place.
    """
    out: list[Path] = []
    for item in inputs:
        s = str(item)
        p = Path(s)
        if p.is_dir():
            found = _images_under(p)
            out.extend(found) if found else out.append(p)
        elif any(ch in s for ch in "*?[") and not p.exists():
            # A pattern may match folders ('slides/*'): they expand like folder inputs. Nothing found: keep
            # the pattern, so it is reported in its place instead of vanishing.
            found: list[Path] = []
            for m in sorted(Path(m) for m in glob.glob(s, recursive=True)):
                found.extend(_images_under(m) if m.is_dir() else [m] if m.is_file() else [])
            out.extend(dict.fromkeys(found)) if found else out.append(p)  # '**' matches nested folders twice
        else:
            out.append(p)
    return out


def _images_under(folder: Path) -> list[Path]:
    """Image files under ``folder``, sorted; symlinked folders are followed (a slide folder may be a link), each real
    folder once, so a symlink loop ends instead of recursing."""
    out: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        out.extend(Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES
                   and (Path(dirpath) / f).is_file())
    return sorted(out)


def cell_mask(bgr: np.ndarray, background_percentile: float = 50.0, clip_percentile: float = 100.0) -> np.ndarray:
    """Cells vs background (uint8 0/255): Otsu threshold on the colour distance from the background, each
    cell's central pallor filled.

    The background colour is the median of the pixels lighter than ``background_percentile`` of the field.
    Distances above ``clip_percentile`` are clipped before the threshold, so that one darkly stained WBC
    does not take the threshold for itself (a field packed with red cells wants 90 and 80).
    """
    import cv2

    lab = cv2.cvtColor(cv2.GaussianBlur(bgr, (5, 5), 0), cv2.COLOR_BGR2LAB).astype(np.float32)
    light = lab[..., 0]
    bg = np.median(lab[light >= np.percentile(light, background_percentile)], axis=0)
    dist = np.sqrt(((lab - bg) ** 2).sum(-1))
    top = float(dist.max()) if clip_percentile >= 100 else float(np.percentile(dist, clip_percentile))
    dist8 = np.clip(dist * (255.0 / max(top, 1e-6)), 0, 255).astype(np.uint8)
    _, mask = cv2.threshold(dist8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    # Fill the central pallor so a cell is one region, not a ring.
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 255, thickness=cv2.FILLED)
    return filled
