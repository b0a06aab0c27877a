"""Every image mode Pillow opens becomes the 8-bit RGB pixels a viewer shows (libs.datasets.base.load_rgb).

The reference for each mode is written here from the file's raw samples with explicit arithmetic (a 16-bit
sample v -> round(255 v / 65535); a palette index -> its palette entry; alpha a over white ->
(c a + 255 (255 - a)) / 255; CMYK -> (255 - c)(255 - k) / 255; EXIF orientation -> the numpy rotation),
not with the conversion under test.
"""
import numpy as np
import pytest
from PIL import Image

from libs.datasets.base import load_rgb
from libs.errors import DataError

H, W = 6, 10
rng = np.random.default_rng(0)


def _over_white(rgb, alpha):
    rgb, a = rgb.astype(np.float64), alpha.astype(np.float64)[..., None]
    return np.rint((rgb * a + 255 * (255 - a)) / 255)


def _grey3(v):
    return np.repeat(v[..., None], 3, axis=2).astype(np.float64)


def _check(path, expected, tol=1):
    got = np.asarray(load_rgb(path)).astype(np.float64)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= tol


def test_grey_8_bit(tmp_path):
    v = rng.integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(v, "L").save(tmp_path / "g.png")
    _check(tmp_path / "g.png", _grey3(v), tol=0)


def test_grey_16_bit_png_is_scaled_not_clipped(tmp_path):
    v = rng.integers(0, 65536, (H, W)).astype(np.uint16)
    Image.fromarray(v).save(tmp_path / "g16.png")  # Pillow writes 16-bit grey (mode I;16)
    with Image.open(tmp_path / "g16.png") as raw:
        samples = np.asarray(raw).astype(np.float64)
    assert np.array_equal(samples, v)  # the file really holds 16-bit samples
    _check(tmp_path / "g16.png", _grey3(np.rint(samples * 255 / 65535)), tol=0)
    assert np.asarray(load_rgb(tmp_path / "g16.png")).mean() < 200  # before: all white


def test_bilevel(tmp_path):
    v = rng.integers(0, 2, (H, W)).astype(bool)
    Image.fromarray(v).convert("1").save(tmp_path / "b.png")
    _check(tmp_path / "b.png", _grey3(v * 255.0), tol=0)


def _palette_image(transparent_index=None):
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (H, W), dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.flatten().tolist())
    if transparent_index is not None:
        img.info["transparency"] = transparent_index
    return img, palette, index


def test_palette(tmp_path):
    img, palette, index = _palette_image()
    img.save(tmp_path / "p.png")
    _check(tmp_path / "p.png", palette[index].astype(np.float64), tol=0)


def test_palette_with_a_transparent_entry(tmp_path):
    img, palette, index = _palette_image(transparent_index=3)
    img.save(tmp_path / "pt.png", transparency=3)
    expected = palette[index].astype(np.float64)
    expected[index == 3] = 255.0
    assert (index == 3).any()
    _check(tmp_path / "pt.png", expected, tol=0)


def test_grey_with_alpha(tmp_path):
    la = rng.integers(0, 256, (H, W, 2), dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    _check(tmp_path / "la.png", _over_white(_grey3(la[..., 0]), la[..., 1]))


def test_rgba(tmp_path):
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # fully transparent: white, whatever colour is stored
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    expected = _over_white(rgba[..., :3], rgba[..., 3])
    assert (expected[0] == 255).all()
    _check(tmp_path / "rgba.png", expected)


def test_cmyk_jpeg(tmp_path):
    cmyk = rng.integers(0, 256, (H * 4, W * 4, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as raw:
        assert raw.mode == "CMYK"
        c, m, y, k = np.moveaxis(np.asarray(raw).astype(np.float64), 2, 0)  # decoded samples, before conversion
    expected = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], axis=2) / 255
    _check(tmp_path / "c.jpg", np.rint(expected))


@pytest.mark.parametrize("orientation,turn", [(3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)),
                                              (8, lambda a: np.rot90(a, 1)), (2, lambda a: a[:, ::-1])])
def test_exif_orientation(tmp_path, orientation, turn):
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation: how a viewer turns the stored pixels
    Image.fromarray(rgb).save(tmp_path / "e.png", exif=exif)
    _check(tmp_path / "e.png", turn(rgb).astype(np.float64), tol=0)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n truncated", b"not an image at all"])
def test_an_undecodable_file_is_one_line_naming_it(tmp_path, content):
    (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(DataError) as info:
        load_rgb(tmp_path / "bad.png")
    assert str(tmp_path / "bad.png") in str(info.value) and "replace or delete it" in str(info.value)
    assert "\n" not in str(info.value)
