"""Every kind of bad or unusual image file a user's folder may hold: converted to RGB, or rejected with the path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vitlab.data.images import BadImageError, load_rgb


def test_rgb_passthrough(tmp_path):
    arr = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    Image.fromarray(arr).save(tmp_path / "a.png")
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "a.png")), arr)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    arr = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    Image.fromarray(arr, "L").save(tmp_path / "g.png")
    out = np.asarray(load_rgb(tmp_path / "g.png"))
    assert out.shape == (2, 2, 3)
    assert np.array_equal(out, np.repeat(arr[..., None], 3, axis=2))


def test_rgba_composited_on_white(tmp_path):
    arr = np.zeros((1, 2, 4), dtype=np.uint8)
    arr[0, 0] = (10, 20, 30, 255)  # opaque: kept
    arr[0, 1] = (10, 20, 30, 0)  # transparent: white
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png"))
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_palette_image(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putdata([0, 1])
    img.save(tmp_path / "p.png")
    out = np.asarray(load_rgb(tmp_path / "p.png"))
    assert out[0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putdata([0, 1])
    img.info["transparency"] = 1
    img.save(tmp_path / "p.png", transparency=1)
    out = np.asarray(load_rgb(tmp_path / "p.png"))
    assert out[0].tolist() == [[255, 0, 0], [255, 255, 255]]


def test_16bit_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = np.asarray(load_rgb(tmp_path / "d.png"))
    # 65535 -> 255 and 32768 -> 128: a plain convert would clip everything above 255 to white.
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "r.jpg")
    white = np.asarray(load_rgb(tmp_path / "c.jpg")).astype(int)
    red = np.asarray(load_rgb(tmp_path / "r.jpg")).astype(int)
    assert np.abs(white - 255).max() <= 3  # no ink is white
    assert red[..., 0].min() > 240 and red[..., 1:].max() < 15  # magenta + yellow ink is red


def test_exif_rotation_applied(tmp_path):
    arr = np.zeros((16, 32, 3), dtype=np.uint8)
    arr[:8, :8] = (255, 0, 0)  # a red block at the top-left of the stored pixels
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "e.jpg", exif=exif, quality=100, subsampling=0)
    out = np.asarray(load_rgb(tmp_path / "e.jpg"))
    assert out.shape == (32, 16, 3)  # width and height swapped
    # After a 90 degree clockwise turn the stored top-left block sits at the top-right.
    assert out[2, 13, 0] > 200 and out[2, 2, 0] < 50


def test_enormous_jpeg_decoded_small(tmp_path):
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(tmp_path / "big.jpg", quality=50)
    out = load_rgb(tmp_path / "big.jpg", max_side=32)
    assert max(out.size) <= 4 * 32 * 1.5 and out.mode == "RGB"
    assert np.abs(np.asarray(out).astype(int)[..., 1] - 200).max() < 6


def test_decompression_bomb_rejected(tmp_path, monkeypatch):
    Image.new("RGB", (200, 200)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 200*200 > 2 * 1000: PIL refuses it
    with pytest.raises(BadImageError, match="bomb.png.*too large"):
        load_rgb(tmp_path / "bomb.png")


@pytest.mark.parametrize("kind", ["zero", "text", "truncated"])
def test_unreadable_files_raise_with_path(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image")
    else:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImageError) as e:
        load_rgb(path)
    assert e.value.path == str(path) and str(path) in str(e.value)
