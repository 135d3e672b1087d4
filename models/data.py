"""NEU-CLS-like steel defect images: a seeded synthetic generator and a loader for the real set.

NEU-CLS (Song & Yan, 2013) holds 1,800 grayscale 200x200 images of hot-rolled steel strip,
300 per class, named like ``Cr_1.bmp``. It cannot be downloaded everywhere this project runs,
so this module draws look-alikes: a rolled-steel background (grain streaked along the rolling
direction, which is horizontal here, plus uneven lighting and fine noise) with one class of
defect on top. Every image is a pure function of ``(class, seed, index, size)``, so a data set is
reproduced from its seed alone and two machines agree on it bit for bit.

Only numpy and Pillow are used, so the module loads on every device (no torch); training code
wraps the arrays into tensors itself.

Exceptions::

    ValueError
     └── DatasetError      an unusable folder, a file name with an unknown class, an unreadable file
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

__all__ = [
    "CLASSES",
    "DEFAULT_SIZE",
    "IMAGE_SUFFIXES",
    "PREFIXES",
    "DatasetError",
    "FolderDefects",
    "Sample",
    "SyntheticDefects",
    "class_index",
    "contact_sheet",
    "generate_image",
    "generate_resized",
    "iter_images",
    "load_folder",
    "read_image",
    "sample_name",
    "split_indices",
]

logger = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = (
    "crazing",
    "inclusion",
    "patches",
    "pitted_surface",
    "rolled-in_scale",
    "scratches",
)
# File-name prefixes exactly as NEU-CLS spells them (case matters: "PS", "RS").
PREFIXES: tuple[str, ...] = ("Cr", "In", "Pa", "PS", "RS", "Sc")
IMAGE_SUFFIXES: frozenset[str] = frozenset({".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"})
DEFAULT_SIZE = 200

Gray = npt.NDArray[np.uint8]
Field = npt.NDArray[np.float32]


class DatasetError(ValueError):
    """A folder or file that cannot be used as defect images; the message names the culprit."""


class Sample(NamedTuple):
    """One image of a stream, with its true label and its NEU-style name (``Cr_17``)."""

    image: Gray
    label: int
    name: str


def class_index(name: str) -> int:
    """The label of a class given its name (``"pitted_surface"``) or NEU prefix (``"PS"``)."""
    if name in CLASSES:
        return CLASSES.index(name)
    if name in PREFIXES:
        return PREFIXES.index(name)
    raise DatasetError(
        f"unknown class {name!r}: expected one of {', '.join(CLASSES)} "
        f"or a prefix {', '.join(PREFIXES)}"
    )


def sample_name(label: int, index: int) -> str:
    """NEU-style name of the ``index``-th (0-based) image of a class: ``Cr_1`` for the first."""
    return f"{PREFIXES[label]}_{index + 1}"


# --------------------------------------------------------------------------------------------
# Smooth noise and blurs as small matrix products: separable, fast in numpy, and free of
# scipy/opencv. The matrices depend only on sizes, so they are cached.


@lru_cache(maxsize=256)
def _spread_matrix(size: int, points: int) -> Field:
    """(size, points) weights that spread a coarse grid of control values smoothly over pixels.

    Gaussian weights around evenly spaced control points, rows normalised to one. The grid
    covers the image in relative units, so the same control values give the same picture at
    any image size.
    """
    positions = (np.arange(size, dtype=np.float64) + 0.5) / size
    centres = (np.arange(points, dtype=np.float64) + 0.5) / points
    spacing = 1.0 / points
    weights = np.exp(-0.5 * ((positions[:, None] - centres[None, :]) / (0.75 * spacing)) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    return _field(weights)


def _grain(rng: np.random.Generator, size: int) -> Field:
    """Fine unit-variance surface grain, slightly longer along x than along y.

    White noise smoothed by binomial taps (1-2-1 down, 1-4-6-4-1 across) made of shifted
    slices: a few additions, far cheaper than a general blur, with edge pixels repeated.
    """
    noise = rng.standard_normal((size + 2, size + 4), dtype=np.float32)
    rows = noise[:-2] + 2.0 * noise[1:-1] + noise[2:]
    grain = (
        rows[:, :-4] + 4.0 * rows[:, 1:-3] + 6.0 * rows[:, 2:-2] + 4.0 * rows[:, 3:-1] + rows[:, 4:]
    )
    # Variance of the taps: (1 + 4 + 1) * (1 + 16 + 36 + 16 + 1) = 420.
    return _field(grain / math.sqrt(420.0))


def _smooth_noise(rng: np.random.Generator, size: int, rows: int, columns: int) -> Field:
    """Zero-mean, unit-variance noise with ``rows`` x ``columns`` degrees of freedom.

    More rows than columns gives streaks along x (the rolling direction). The control grid is
    drawn from ``rng`` with a size-independent count, so layouts agree across image sizes.
    """
    grid = rng.standard_normal((rows, columns), dtype=np.float32)
    field = _field(_spread_matrix(size, rows) @ grid @ _spread_matrix(size, columns).T)
    field -= field.mean()
    deviation = float(field.std())
    return _field(field / deviation) if deviation > 0 else field


def _field(values: npt.ArrayLike) -> Field:
    """As float32: the working precision, and what numpy's stubs need to see."""
    return np.asarray(values, dtype=np.float32)


def _sigmoid(values: npt.ArrayLike) -> Field:
    # The tanh form never overflows, unlike 1 / (1 + exp(-x)) for large negative x.
    return _field(0.5 + 0.5 * np.tanh(0.5 * _field(values)))


def _coordinates(size: int) -> tuple[Field, Field]:
    """Pixel centres in relative units (0..1), as broadcastable column and row vectors."""
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
    return axis[:, None], axis[None, :]


# --------------------------------------------------------------------------------------------
# The background and the six defects. Each defect draws its layout from `layout` (sizes and
# positions in relative units, a size-independent number of draws) and per-pixel texture from
# `texture`. They return a field in background units: the background has unit-ish variance,
# negative is darker.


def _background(layout: np.random.Generator, texture: np.random.Generator, size: int) -> Field:
    y, x = _coordinates(size)
    grain = _smooth_noise(layout, size, 90, 5)  # long horizontal streaks of the rolling
    mottle = _smooth_noise(layout, size, 24, 10)  # medium, slightly elongated unevenness
    lighting = _smooth_noise(layout, size, 3, 3)  # uneven illumination over the whole strip
    angle = layout.uniform(0.0, 2.0 * math.pi)
    tilt = layout.uniform(0.0, 1.2) * ((x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle))
    weights = layout.uniform([0.25, 0.15, 0.2, 0.3], [0.7, 0.45, 0.7, 0.6])
    fine = _grain(texture, size)
    field = (
        weights[0] * grain + weights[1] * mottle + weights[2] * lighting + weights[3] * fine + tilt
    )
    return _field(field)


def _crazing(layout: np.random.Generator, texture: np.random.Generator, size: int) -> Field:
    """A network of fine dark cracks: thin lines along the zero crossings of smooth noise."""
    scale = size / DEFAULT_SIZE
    cracks = np.zeros((size, size), dtype=np.float32)
    for _ in range(3):
        rows = int(layout.integers(28, 50))
        columns = max(4, int(rows * layout.uniform(0.2, 0.5)))  # cracks run mostly along x
        field = _smooth_noise(layout, size, rows, columns)
        # Line width in pixels ≈ width / |gradient|; keep at least about a pixel at any size.
        width = layout.uniform(0.1, 0.2) / max(scale, 0.35)
        # Break the zero-crossing contours into short segments so no closed loops show.
        pieces = _sigmoid(4.0 * (_smooth_noise(layout, size, 24, 16) + 0.3))
        cracks = np.maximum(cracks, np.exp(-((field / width) ** 2)) * pieces)
    presence = _sigmoid(2.5 * (_smooth_noise(layout, size, 4, 4) + layout.uniform(0.5, 2.0)))
    strength = layout.uniform(1.5, 3.0)
    del texture  # the background's grain already roughens the cracks
    return _field(-strength * cracks * presence)


def _box(centre: float, radius: float, size: int) -> tuple[int, int]:
    low = max(0, math.floor((centre - radius) * size))
    high = min(size, math.ceil((centre + radius) * size) + 1)
    return low, high


def _add_spot(
    field: Field,
    centre_y: float,
    centre_x: float,
    radius_y: float,
    radius_x: float,
    amplitude: float,
    sharpness: float,
) -> None:
    """Add an elliptical spot (relative units) with a soft edge, touching only its box."""
    size = field.shape[0]
    top, bottom = _box(centre_y, 3.0 * radius_y, size)
    left, right = _box(centre_x, 3.0 * radius_x, size)
    if top >= bottom or left >= right:
        return
    y = (np.arange(top, bottom, dtype=np.float32)[:, None] + 0.5) / size
    x = (np.arange(left, right, dtype=np.float32)[None, :] + 0.5) / size
    distance = ((y - centre_y) / radius_y) ** 2 + ((x - centre_x) / radius_x) ** 2
    field[top:bottom, left:right] += amplitude * np.exp(-(distance**sharpness))


def _inclusion(layout: np.random.Generator, texture: np.random.Generator, size: int) -> Field:
    """Elongated dark (sometimes bright) spots and streaks strung along the rolling direction."""
    field = np.zeros((size, size), dtype=np.float32)
    minimum = 0.7 / size  # keep a spot at least about a pixel thick
    for _ in range(int(layout.integers(1, 5))):
        row = layout.uniform(0.05, 0.95)
        start = layout.uniform(0.0, 0.7)
        span = layout.uniform(0.15, 0.95 - start)
        polarity = -1.0 if layout.random() < 0.8 else 1.0
        thickness = layout.uniform(0.008, 0.03)
        for _ in range(int(layout.integers(3, 12))):
            _add_spot(
                field,
                row + layout.normal(0.0, 0.015),
                start + span * layout.random(),
                max(thickness * layout.uniform(0.5, 1.5), minimum),
                layout.uniform(0.02, 0.1),
                polarity * layout.uniform(2.0, 4.5),
                layout.uniform(0.5, 1.0),
            )
    # Ragged, mottled spots rather than smooth ellipses.
    roughness = 1.0 + 0.3 * _smooth_noise(layout, size, 60, 40) + 0.2 * _grain(texture, size)
    return _field(field * roughness)


def _patches(layout: np.random.Generator, texture: np.random.Generator, size: int) -> Field:
    """Large blotchy regions, mostly darker, with ragged edges and texture inside."""
    coarse = int(layout.integers(3, 8))
    shape = _smooth_noise(layout, size, coarse, coarse) + 0.35 * _smooth_noise(layout, size, 30, 16)
    coverage = layout.uniform(0.15, 0.55)
    threshold = float(np.quantile(shape, 1.0 - coverage))
    mask = _sigmoid((shape - threshold) / layout.uniform(0.04, 0.15))
    polarity = -1.0 if layout.random() < 0.8 else 1.0
    inside = 1.0 + 0.35 * _smooth_noise(layout, size, 40, 20)
    speckle = 0.2 * _grain(texture, size)
    strength = layout.uniform(2.0, 3.5) if polarity < 0 else layout.uniform(1.2, 2.2)
    return _field(polarity * strength * mask * (inside + speckle))


def _pitted_surface(layout: np.random.Generator, texture: np.random.Generator, size: int) -> Field:
    """Many small dark pits, scattered or gathered in a band, over a slightly darker area."""
    field = np.zeros((size, size), dtype=np.float32)
    count = int(layout.integers(40, 160))
    if layout.random() < 0.5:
        ys = layout.uniform(0.0, 1.0, count)
    else:  # pits gathered in a band across the strip
        ys = layout.normal(layout.uniform(0.2, 0.8), layout.uniform(0.06, 0.2), count)
    xs = layout.uniform(0.0, 1.0, count)
    radii = layout.uniform(0.004, 0.016, count) * np.where(layout.random(count) < 0.15, 2.0, 1.0)
    depths = layout.uniform(2.0, 4.0, count)
    minimum = 0.6 / size
    for cy, cx, radius, depth in zip(ys, xs, radii, depths, strict=True):
        r = max(float(radius), minimum)
        _add_spot(field, float(cy), float(cx), r, r * 1.3, -float(depth), 1.0)
    shade = -layout.uniform(0.0, 0.8) * _sigmoid(2.0 * _smooth_noise(layout, size, 4, 4))
    roughness = 1.0 + 0.2 * _grain(texture, size)
    return _field(field * roughness + shade)


def _rolled_in_scale(layout: np.random.Generator, texture: np.random.Generator, size: int) -> Field:
    """Scattered flakes of scale pressed into the strip, elongated along the rolling direction."""
    rows = int(layout.integers(50, 90))
    columns = max(6, int(rows * layout.uniform(0.2, 0.45)))
    flakes = _smooth_noise(layout, size, rows, columns)
    threshold = layout.uniform(0.4, 1.1)
    sharpness = layout.uniform(0.08, 0.2)
    dark = _sigmoid((flakes - threshold) / sharpness)
    bright = _sigmoid((-flakes - threshold - 0.3) / sharpness)
    region = _sigmoid(3.0 * (_smooth_noise(layout, size, 3, 4) + layout.uniform(0.5, 2.0)))
    crumbs = 1.0 + 0.5 * _grain(texture, size)
    dark_strength = layout.uniform(1.6, 3.0)
    bright_strength = layout.uniform(0.8, 2.0)
    field = region * crumbs * (bright_strength * bright - dark_strength * dark)
    return _field(field)


def _scratches(layout: np.random.Generator, texture: np.random.Generator, size: int) -> Field:
    """A few long thin lines, often parallel, bright or dark, at a random angle."""
    del texture  # the lines are smooth; texture comes from the background
    y, x = _coordinates(size)
    field = np.zeros((size, size), dtype=np.float32)
    dominant = layout.uniform(0.0, math.pi)
    for _ in range(int(layout.integers(1, 5))):
        angle = dominant + layout.normal(0.0, 0.12)
        direction_y, direction_x = math.sin(angle), math.cos(angle)
        centre_y, centre_x = layout.uniform(0.1, 0.9, 2)
        along = (y - centre_y) * direction_y + (x - centre_x) * direction_x
        across = (y - centre_y) * direction_x - (x - centre_x) * direction_y
        across = across + layout.normal(0.0, 0.15) * along**2  # a slight bend
        half_length = layout.uniform(0.3, 0.9)
        width = max(layout.uniform(0.004, 0.012), 0.7 / size)
        ends = _sigmoid((half_length - np.abs(along)) * 40.0)
        fade = 0.7 + 0.3 * np.cos(along * layout.uniform(3.0, 12.0) + layout.uniform(0, 6.3))
        polarity = 1.0 if layout.random() < 0.7 else -1.0
        strength = polarity * layout.uniform(3.0, 5.5)
        field += strength * np.exp(-((across / width) ** 2)) * ends * fade
    return _field(field)


_DEFECTS = (_crazing, _inclusion, _patches, _pitted_surface, _rolled_in_scale, _scratches)


def generate_image(class_index: int, seed: int, size: int = DEFAULT_SIZE, index: int = 0) -> Gray:
    """One synthetic grayscale defect image of class ``class_index`` (0..5).

    The result depends only on the arguments. ``index`` numbers the images of a class within
    one data set (``SyntheticDefects`` and ``iter_images`` pass it). The defect layout is drawn
    in relative units, so the same arguments at another ``size`` show the same scene.
    """
    if not 0 <= class_index < len(CLASSES):
        raise ValueError(f"class_index must be in 0..{len(CLASSES) - 1}, got {class_index}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got {seed} and {index}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    layout_sequence, texture_sequence = np.random.SeedSequence([seed, class_index, index]).spawn(2)
    layout = np.random.default_rng(layout_sequence)
    texture = np.random.default_rng(texture_sequence)
    field = _background(layout, texture, size) + _DEFECTS[class_index](layout, texture, size)
    # Brightness and contrast vary a lot between NEU images; drawing them per image keeps the
    # mean grey level from giving the class away.
    brightness = layout.uniform(70.0, 185.0)
    contrast = layout.uniform(9.0, 20.0)
    return np.asarray(np.clip(np.rint(brightness + contrast * field), 0, 255), dtype=np.uint8)


def generate_resized(class_index: int, seed: int, index: int, size: int) -> Gray:
    """``generate_image`` at 200 px, area-resized to ``size`` as ``read_image`` resizes a file.

    Training at a reduced size sees the pixels a camera image resized the same way would
    give, rather than the generator's own rendering at that size. Module-level (and
    torch-free) so a process pool can call it cheaply.
    """
    image = generate_image(class_index, seed, DEFAULT_SIZE, index)
    if size == DEFAULT_SIZE:
        return image
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BOX)
    return np.asarray(resized, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Data sets


class SyntheticDefects(Sequence[tuple[Gray, int]]):
    """``per_class`` synthetic images of each class, class by class, generated on access.

    Item ``i`` is ``(image, label)`` with ``label = i // per_class``; it is the image that
    NEU would name ``sample_name(label, i % per_class)``. Nothing is stored, so a large set
    costs no memory until ``arrays()`` is asked for.
    """

    def __init__(self, per_class: int, seed: int, size: int = DEFAULT_SIZE) -> None:
        if per_class < 1:
            raise ValueError(f"per_class must be at least 1, got {per_class}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.per_class = per_class
        self.seed = seed
        self.size = size

    def __len__(self) -> int:
        return self.per_class * len(CLASSES)

    @overload
    def __getitem__(self, position: int) -> tuple[Gray, int]: ...

    @overload
    def __getitem__(self, position: slice) -> list[tuple[Gray, int]]: ...

    def __getitem__(self, position: int | slice) -> tuple[Gray, int] | list[tuple[Gray, int]]:
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        label, index = self.locate(position)
        return generate_image(label, self.seed, self.size, index), label

    def locate(self, position: int) -> tuple[int, int]:
        """(label, index within the class) of item ``position``; negative counts from the end."""
        length = len(self)
        if not -length <= position < length:
            raise IndexError(f"position {position} out of range for {length} images")
        position %= length
        return position // self.per_class, position % self.per_class

    def name(self, position: int) -> str:
        """NEU-style name of item ``position`` (``Cr_1`` …)."""
        return sample_name(*self.locate(position))

    @property
    def labels(self) -> list[int]:
        """All labels in order, without generating any image (for ``split_indices``)."""
        return [label for label in range(len(CLASSES)) for _ in range(self.per_class)]

    def arrays(self, positions: Sequence[int] | None = None) -> tuple[Gray, npt.NDArray[np.int64]]:
        """Images stacked as ``(n, size, size)`` uint8 and labels as ``(n,)`` int64."""
        chosen = range(len(self)) if positions is None else positions
        images = np.empty((len(chosen), self.size, self.size), dtype=np.uint8)
        labels = np.empty(len(chosen), dtype=np.int64)
        for row, position in enumerate(chosen):
            images[row], labels[row] = self[position]
        return images, labels


def iter_images(
    seed: int, size: int = DEFAULT_SIZE, count: int | None = None, start: int = 0
) -> Iterator[Sample]:
    """A stream of synthetic images cycling through the classes: Cr_1, In_1, …, Sc_1, Cr_2, …

    Endless when ``count`` is None (a camera that never stops); ``start`` skips that many
    images first. Image ``k`` of the stream is ``generate_image(k % 6, seed, size, k // 6)``,
    so it equals the matching item of ``SyntheticDefects`` with the same seed and size.
    """
    position = start
    while count is None or position < start + count:
        label, index = position % len(CLASSES), position // len(CLASSES)
        yield Sample(generate_image(label, seed, size, index), label, sample_name(label, index))
        position += 1


def split_indices(
    labels: Sequence[int], test_fraction: float = 0.3, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Stratified train/test split: each class contributes ``test_fraction`` of itself to test.

    Deterministic for a given seed. A class with at least two images keeps at least one on
    each side, so a tiny set still tests every class. Returns sorted position lists.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B117]))
    label_array = np.asarray(labels, dtype=np.int64)
    train: list[int] = []
    test: list[int] = []
    for label in np.unique(label_array):
        members = np.flatnonzero(label_array == label)
        members = members[rng.permutation(len(members))]
        count = round(len(members) * test_fraction)
        if len(members) >= 2 and 0.0 < test_fraction < 1.0:
            count = min(max(count, 1), len(members) - 1)
        test.extend(int(i) for i in members[:count])
        train.extend(int(i) for i in members[count:])
    return sorted(train), sorted(test)


# --------------------------------------------------------------------------------------------
# Real NEU-CLS images on disk

# "Cr_12", "PS_3", "rolled-in_scale_7": a class prefix or name, an underscore, a number.
_NAME_PATTERN = re.compile(r"^(?P<prefix>.+)_(?P<number>\d+)$")


def _class_of_file(path: Path) -> int:
    match = _NAME_PATTERN.match(path.stem)
    if match is None:
        raise DatasetError(
            f"{path}: cannot tell the class from the name; expected PREFIX_NUMBER "
            f"with PREFIX one of {', '.join(PREFIXES)} (as in Cr_1.bmp), or one folder per class"
        )
    prefix = match["prefix"]
    if prefix in PREFIXES:
        return PREFIXES.index(prefix)
    if prefix in CLASSES:
        return CLASSES.index(prefix)
    raise DatasetError(
        f"{path}: unknown class prefix {prefix!r}; NEU-CLS prefixes are "
        f"{', '.join(PREFIXES)} (case-sensitive)"
    )


def _check_readable(path: Path) -> None:
    """Parse the image header now, so a broken file is reported by name before any work."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError) as error:  # Pillow raises all three
        raise DatasetError(f"{path}: not a readable image ({error})") from error


def _image_files(folder: Path) -> list[Path]:
    return [
        entry
        for entry in folder.iterdir()
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES
    ]


def _natural_key(item: tuple[Path, int]) -> tuple[int, int, str]:
    path, label = item
    match = _NAME_PATTERN.match(path.stem)
    number = int(match["number"]) if match is not None else -1
    return label, number, path.name


def load_folder(path: str | Path, check: bool = True) -> list[tuple[Path, int]]:
    """The images of a NEU-CLS-style folder as ``(path, label)``, sorted by class and number.

    Two layouts are accepted, also mixed: image files named ``PREFIX_NUMBER.ext`` directly in
    ``path`` (``Cr_1.bmp``, ``PS_12.bmp``, as NEU-CLS ships), and sub-folders named after a
    class (``crazing``) or its prefix (``Cr``) holding that class's images under any name.
    Other sub-folders and non-image files are ignored. With ``check`` every file's header is
    parsed, so an unreadable file is reported here, by name.

    Raises DatasetError for a missing or empty folder, an unknown prefix, or a broken file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    found: list[tuple[Path, int]] = [(file, _class_of_file(file)) for file in _image_files(folder)]
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if entry.name in CLASSES or entry.name in PREFIXES:
            label = class_index(entry.name)
            found.extend((file, label) for file in _image_files(entry))
        else:
            logger.info("ignoring %s: not named after a class", entry)
    if not found:
        raise DatasetError(
            f"{folder}: no images found; expected files like Cr_1.bmp or one sub-folder per "
            f"class named {', '.join(CLASSES)} (or {', '.join(PREFIXES)})"
        )
    if check:
        for file, _label in found:
            _check_readable(file)
    return sorted(found, key=_natural_key)


DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
"""Largest image `read_image` decodes by default (40 Mpixel: a 6000x6000 photo fits;
a decompression bomb does not). Checked from the file's header, before decoding."""

# Pillow modes of more than 8 bits per sample, one channel: converting them to "L"
# clips every value above 255 instead of scaling it.
_WIDE_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


def read_image(
    path: str | Path,
    size: int = DEFAULT_SIZE,
    *,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    min_side: int = 1,
) -> Gray:
    """One image as grayscale uint8 ``(size, size)``, resized (area-averaged) if needed.

    Raises `DatasetError` (and nothing else) for a file that is not a readable
    image, one of more than `max_pixels` pixels (checked from its header, before
    anything is decoded; None: no bound) and one whose shorter side is below
    `min_side` pixels (too small to say anything at the model's input size).
    Images of more than 8 bits per sample (16-bit PNG, TIFF) are scaled by their
    real range: by the smallest bit depth that holds their largest value, so a
    12-bit sensor's 4095 is white, and nothing is clipped.
    """
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise DatasetError(
                    f"{path}: {width}x{height} is {width * height} pixels, over the "
                    f"limit of {max_pixels}"
                )
            if min(width, height) < min_side:
                raise DatasetError(
                    f"{path}: {width}x{height} is smaller than the model's minimum input "
                    f"of {min_side}x{min_side}"
                )
            image = _wide_to_gray(opened) if opened.mode in _WIDE_MODES else opened.convert("L")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BOX)
            return np.asarray(image, dtype=np.uint8).copy()
    except DatasetError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own bound, at open
        raise DatasetError(f"{path}: too many pixels to decode safely ({error})") from error
    # A truncated file raises OSError, an unknown format UnidentifiedImageError (one too).
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"{path}: not a readable image ({error})") from error


def _wide_to_gray(image: Image.Image) -> Image.Image:
    """An image of more than 8 bits per sample as 8-bit grayscale, scaled by its range."""
    values = np.asarray(image, dtype=np.float64)
    if values.size and not np.isfinite(values).all():
        raise DatasetError("the image holds non-finite values")
    values = np.clip(values, 0.0, None)
    top = float(values.max()) if values.size else 0.0
    if image.mode == "F" and top <= 1.0:
        full = 1.0  # a float image in [0, 1]
    else:
        full = float(2 ** max(8, math.ceil(math.log2(top + 1))) - 1) if top > 0 else 255.0
    scaled = np.rint(values * (255.0 / full)).astype(np.uint8)
    return Image.fromarray(scaled)


class FolderDefects(Sequence[tuple[Gray, int]]):
    """Real images from a folder (see ``load_folder``), with the interface of SyntheticDefects."""

    def __init__(self, path: str | Path, size: int = DEFAULT_SIZE) -> None:
        self.items = load_folder(path)
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, position: int) -> tuple[Gray, int]: ...

    @overload
    def __getitem__(self, position: slice) -> list[tuple[Gray, int]]: ...

    def __getitem__(self, position: int | slice) -> tuple[Gray, int] | list[tuple[Gray, int]]:
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        path, label = self.items[position]
        return read_image(path, self.size), label

    def name(self, position: int) -> str:
        return self.items[position][0].stem

    @property
    def labels(self) -> list[int]:
        return [label for _path, label in self.items]

    def arrays(self, positions: Sequence[int] | None = None) -> tuple[Gray, npt.NDArray[np.int64]]:
        """Images stacked as ``(n, size, size)`` uint8 and labels as ``(n,)`` int64."""
        chosen = range(len(self)) if positions is None else positions
        images = np.empty((len(chosen), self.size, self.size), dtype=np.uint8)
        labels = np.empty(len(chosen), dtype=np.int64)
        for row, position in enumerate(chosen):
            images[row], labels[row] = self[position]
        return images, labels


# --------------------------------------------------------------------------------------------
# A picture of the data set, for people


def contact_sheet(
    per_class: int = 4, seed: int = 0, size: int = DEFAULT_SIZE, gap: int = 4
) -> Image.Image:
    """A grid of ``per_class`` synthetic samples per class, one labelled row per class."""
    label_width = 120
    width = label_width + per_class * (size + gap) + gap
    height = len(CLASSES) * (size + gap) + gap
    sheet = Image.new("L", (width, height), color=255)
    draw = ImageDraw.Draw(sheet)
    for label, name in enumerate(CLASSES):
        top = gap + label * (size + gap)
        draw.text((6, top + size // 2 - 12), f"{name}\n({PREFIXES[label]})", fill=0)
        for index in range(per_class):
            left = label_width + gap + index * (size + gap)
            sheet.paste(Image.fromarray(generate_image(label, seed, size, index)), (left, top))
    return sheet
