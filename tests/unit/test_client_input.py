"""Client input (issue 12, item 5): what `edgedi infer` reads from image files.

A decompression bomb is refused from its header before anything is decoded, with
a limit that is a setting; a tiny image is refused; 16-bit images are scaled by
their real range instead of clipped; every problem is a `DatasetError` naming the
file, never another exception.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgedi.models.data import DEFAULT_MAX_IMAGE_PIXELS, DatasetError, read_image
from edgedi.models.specs import MODEL_NAMES, get_spec, minimum_input_size


@pytest.mark.parametrize(("width", "height"), [(15000, 15000), (7000, 7000)])
def test_an_oversized_image_is_refused_from_its_header(
    tmp_path: Path, png_claiming: Callable[[Path, int, int], Path], width: int, height: int
) -> None:
    path = png_claiming(tmp_path / "bomb.png", width, height)
    with pytest.raises(DatasetError, match=r"bomb\.png") as caught:
        read_image(path, 64)
    assert "pixels" in str(caught.value)
    if width * height < 2 * Image.MAX_IMAGE_PIXELS:  # under Pillow's own refusal
        assert f"over the limit of {DEFAULT_MAX_IMAGE_PIXELS}" in str(caught.value)


def test_the_pixel_limit_is_a_setting(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    Image.new("L", (300, 200), 90).save(path)
    with pytest.raises(DatasetError, match="over the limit of 59999"):
        read_image(path, 64, max_pixels=59_999)
    assert read_image(path, 64, max_pixels=60_000).shape == (64, 64)
    assert read_image(path, 64, max_pixels=None).shape == (64, 64)


def test_a_tiny_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.png"
    Image.new("L", (4, 40), 90).save(path)
    with pytest.raises(DatasetError, match="smaller than the model's minimum input of 8x8"):
        read_image(path, 64, min_side=8)
    assert read_image(path, 64, min_side=4).shape == (64, 64)


def test_the_minimum_input_is_the_smallest_size_a_model_takes() -> None:
    for name in MODEL_NAMES:
        smallest = minimum_input_size(name)
        get_spec(name, smallest)  # builds
        if smallest > 1:
            with pytest.raises(ValueError, match="too small"):
                get_spec(name, smallest - 1)


@pytest.mark.parametrize(("bits", "factor"), [(16, 257), (12, 4095 / 255), (10, 1023 / 255)])
def test_a_wide_image_is_scaled_by_its_real_range(tmp_path: Path, bits: int, factor: float) -> None:
    rng = np.random.default_rng(bits)
    eight = rng.integers(0, 256, (64, 64), dtype=np.uint16)
    eight[0, 0] = 255  # the full range is used
    wide = np.rint(eight * factor).astype(np.uint16)
    assert int(wide.max()).bit_length() == bits
    path = tmp_path / f"wide{bits}.png"
    Image.fromarray(wide).save(path)
    with Image.open(path) as opened:
        assert opened.mode in ("I;16", "I")  # what Pillow calls a 16-bit grayscale PNG
    loaded = read_image(path, 64)
    # The 8-bit image it was made from, not 99 % white.
    assert np.abs(loaded.astype(int) - eight.astype(int)).max() <= 1
    assert (loaded == 255).mean() < 0.05


def test_a_dark_sixteen_bit_image_stays_dark(tmp_path: Path) -> None:
    # Values up to 300 of 65535 are a dark 9-bit image: scaled by 511, not stretched to white.
    wide = np.full((32, 32), 300, dtype=np.uint16)
    wide[:, :16] = 0
    path = tmp_path / "dark.png"
    Image.fromarray(wide).save(path)
    loaded = read_image(path, 32)
    assert loaded[0, 31] == round(300 * 255 / 511)
    assert loaded[0, 0] == 0


def test_a_float_image_in_the_unit_range_is_scaled(tmp_path: Path) -> None:
    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    path = tmp_path / "float.tiff"
    Image.fromarray(values).save(path)
    loaded = read_image(path, 32)
    assert loaded.min() == 0 and loaded.max() == 255


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_unreadable_files_are_a_dataset_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=r"broken\.png: not a readable image"):
        read_image(path, 64)
