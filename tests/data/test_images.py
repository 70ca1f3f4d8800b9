"""``read_image`` for every common format and failure, and ``expand_inputs`` for files, folders and globs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from smear.configs.errors import ImageReadError, SmearError
from smear.data.images import expand_inputs, read_image


def _rgb(h: int = 40, w: int = 60) -> np.ndarray:
    """Left half red, right half blue, so a channel swap or rotation shows."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 30, 30)
    img[:, w // 2:] = (30, 30, 200)
    return img


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg"])
def test_colour_formats_read_as_rgb_uint8(tmp_path, suffix):
    p = tmp_path / f"img{suffix}"
    Image.fromarray(_rgb()).save(p)
    img = read_image(p)
    assert img.dtype == np.uint8 and img.shape == (40, 60, 3)
    tol = 12 if suffix in (".jpg", ".jpeg") else 0
    assert np.abs(img[20, 5].astype(int) - (200, 30, 30)).max() <= tol   # red stays red (RGB, not BGR)
    assert np.abs(img[20, 55].astype(int) - (30, 30, 200)).max() <= tol


def test_upper_case_suffix(tmp_path):
    p = tmp_path / "IMG.JPG"
    Image.fromarray(_rgb()).save(p, format="JPEG")
    assert read_image(p).shape == (40, 60, 3)


def test_grayscale_expanded(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.full((10, 12), 77, np.uint8), mode="L").save(p)
    img = read_image(p)
    assert img.shape == (10, 12, 3) and (img == 77).all()


def test_rgba_alpha_dropped(tmp_path):
    p = tmp_path / "a.png"
    arr = np.zeros((10, 12, 4), np.uint8)
    arr[..., :3] = (10, 100, 200)
    arr[..., 3] = 0  # fully transparent: colour must survive anyway
    Image.fromarray(arr, mode="RGBA").save(p)
    img = read_image(p)
    assert img.shape == (10, 12, 3) and tuple(img[0, 0]) == (10, 100, 200)


def test_16bit_png_scaled_to_8bit(tmp_path):
    p = tmp_path / "deep.png"
    arr = np.zeros((8, 8, 3), np.uint16)
    arr[..., 0] = 65535
    arr[..., 1] = 257 * 128
    arr[..., 2] = 0
    cv2.imwrite(str(p), arr[..., ::-1])  # OpenCV writes BGR
    img = read_image(p)
    assert img.dtype == np.uint8 and img.shape == (8, 8, 3)
    assert tuple(img[0, 0]) == (255, 128, 0)


def test_16bit_grayscale_png(tmp_path):
    p = tmp_path / "deep_gray.png"
    cv2.imwrite(str(p), np.full((5, 7), 257 * 200, np.uint16))
    img = read_image(p)
    assert img.shape == (5, 7, 3) and (img == 200).all()


def test_exif_orientation_applied(tmp_path):
    p = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_rgb(40, 60)).save(p, exif=exif.tobytes(), quality=95)
    img = read_image(p)
    assert img.shape == (60, 40, 3)
    # red (left half as stored) ends up on top after a clockwise turn
    assert img[5, 20, 0] > 150 and img[55, 20, 2] > 150


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty file") as e:
        read_image(p)
    assert str(p) in str(e.value)


def test_garbage_bytes(tmp_path):
    p = tmp_path / "garbage.jpg"
    p.write_bytes(b"\x00\x01 definitely not an image" * 20)
    with pytest.raises(ImageReadError, match="cannot decode") as e:
        read_image(p)
    assert str(p) in str(e.value) and ".png" in str(e.value)  # lists what is supported


def test_truncated_png(tmp_path):
    p = tmp_path / "cut.png"
    Image.fromarray(_rgb()).save(p)
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    assert str(p) in str(e.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match="file not found") as e:
        read_image(tmp_path / "nope.png")
    assert "nope.png" in str(e.value)
    with pytest.raises(ImageReadError, match="a folder with no images"):
        read_image(tmp_path)
    assert issubclass(ImageReadError, SmearError)


def _touch_images(root: Path, names: list[str]) -> None:
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_expand_folder_recursive_images_only_sorted(tmp_path):
    _touch_images(tmp_path, ["b.jpg", "a.PNG", "sub/c.tif", "sub/deeper/d.bmp", "notes.txt", "sub/e.json"])
    got = expand_inputs([tmp_path])
    assert got == sorted([tmp_path / "a.PNG", tmp_path / "b.jpg", tmp_path / "sub" / "c.tif",
                          tmp_path / "sub" / "deeper" / "d.bmp"])


def test_expand_globs_files_and_missing_keep_input_order(tmp_path):
    _touch_images(tmp_path, ["x1.jpg", "x2.jpg", "y.png", "sub/z.jpg"])
    missing = tmp_path / "missing.jpg"
    got = expand_inputs([str(tmp_path / "y.png"), str(tmp_path / "x*.jpg"), str(missing),
                         str(tmp_path / "**" / "z.jpg"), str(tmp_path / "nomatch*.png")])
    assert got == [tmp_path / "y.png", tmp_path / "x1.jpg", tmp_path / "x2.jpg", missing,
                   tmp_path / "sub" / "z.jpg", tmp_path / "nomatch*.png"]


def test_expand_keeps_explicit_non_image_file(tmp_path):
    _touch_images(tmp_path, ["notes.txt"])
    assert expand_inputs([tmp_path / "notes.txt"]) == [tmp_path / "notes.txt"]  # read_image reports it later
    assert expand_inputs([]) == []


def test_expand_glob_matching_folders_expands_them(tmp_path):
    _touch_images(tmp_path, ["slides/A/1.jpg", "slides/A/2.png", "slides/B/3.jpg", "slides/B/notes.txt"])
    root = tmp_path / "slides"
    expected = [root / "A" / "1.jpg", root / "A" / "2.png", root / "B" / "3.jpg"]
    assert expand_inputs([str(root / "*")]) == expected
    both = expand_inputs([str(root / "**")])  # matches the folders and, recursively, the files in them
    assert len(both) == len(set(both)) and set(expected) <= set(both)
    empty = tmp_path / "empty" / "sub"
    empty.mkdir(parents=True)
    assert expand_inputs([str(tmp_path / "empty" / "*")]) == [tmp_path / "empty" / "*"]  # reported, not dropped


def test_cut_short_and_multi_page_files_are_named(tmp_path):
    import cv2
    import numpy as np

    from smear.data.images import ImageReadError, file_warnings, read_image

    img = (np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "whole.jpg"), img)
    cv2.imwrite(str(tmp_path / "whole.png"), img)
    for name in ("jpg", "png"):
        data = (tmp_path / f"whole.{name}").read_bytes()
        (tmp_path / f"cut.{name}").write_bytes(data[: len(data) // 3])
    assert file_warnings(tmp_path / "whole.jpg") == [] and file_warnings(tmp_path / "whole.png") == []
    assert read_image(tmp_path / "cut.jpg").shape == (120, 160, 3)  # the decoded part is used, with a warning
    (w,) = file_warnings(tmp_path / "cut.jpg")
    assert w.startswith(f"{tmp_path / 'cut.jpg'}: truncated JPEG")
    with pytest.raises(ImageReadError, match="truncated PNG"):
        read_image(tmp_path / "cut.png")
    cv2.imwritemulti(str(tmp_path / "pages.tif"), [img, img, img])
    assert file_warnings(tmp_path / "pages.tif") == [f"{tmp_path / 'pages.tif'}: TIFF with 3 pages: only the first "
                                                    "page was analysed"]


def test_image_cache_applies_its_transform_once_per_field(tmp_path):
    from smear.data.crops import ImageCache

    p = tmp_path / "field.png"
    Image.fromarray(_rgb()).save(p)
    calls = []

    def invert(image):
        calls.append(1)
        return 255 - image

    cache = ImageCache(invert)
    first, again = cache.get(str(p)), cache.get(str(p))
    assert len(calls) == 1 and again is first
    assert np.array_equal(first, 255 - read_image(p))
    assert np.array_equal(ImageCache().get(str(p)), read_image(p))
