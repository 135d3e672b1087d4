"""The synthetic NEU-CLS look-alike generator, the split helper, the folder loader and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from edgedi.agent.cli import main
from edgedi.models.data import (
    CLASSES,
    PREFIXES,
    DatasetError,
    FolderDefects,
    SyntheticDefects,
    class_index,
    contact_sheet,
    generate_image,
    iter_images,
    load_folder,
    read_image,
    split_indices,
)

SMALL = 48  # enough pixels for every defect to show, cheap enough for many images


def test_class_names_and_prefixes_follow_neu_cls() -> None:
    assert CLASSES == (
        "crazing",
        "inclusion",
        "patches",
        "pitted_surface",
        "rolled-in_scale",
        "scratches",
    )
    assert PREFIXES == ("Cr", "In", "Pa", "PS", "RS", "Sc")
    assert class_index("PS") == class_index("pitted_surface") == 3
    with pytest.raises(DatasetError, match="unknown class"):
        class_index("ps")


@pytest.mark.parametrize("label", range(len(CLASSES)))
def test_generate_image_is_a_pure_function_of_its_arguments(label: int) -> None:
    image = generate_image(label, seed=5, size=SMALL, index=3)
    assert image.shape == (SMALL, SMALL)
    assert image.dtype == np.uint8
    assert image.tobytes() == generate_image(label, 5, SMALL, 3).tobytes()
    assert image.tobytes() != generate_image(label, 6, SMALL, 3).tobytes()
    assert image.tobytes() != generate_image(label, 5, SMALL, 4).tobytes()
    assert image.tobytes() != generate_image((label + 1) % len(CLASSES), 5, SMALL, 3).tobytes()
    # Not a flat or saturated picture.
    assert float(image.std()) > 3.0
    assert 20 < float(image.mean()) < 235


def test_default_size_is_neu_cls_size() -> None:
    image = generate_image(0, seed=0)
    assert image.shape == (200, 200)
    assert image.dtype == np.uint8


def test_same_scene_at_another_size() -> None:
    """The layout is drawn in relative units: a smaller image is the same scene, scaled."""
    large = generate_image(2, seed=1, size=96).astype(np.float64)
    small = generate_image(2, seed=1, size=48).astype(np.float64)
    shrunk = large.reshape(48, 2, 48, 2).mean(axis=(1, 3))
    assert np.corrcoef(shrunk.ravel(), small.ravel())[0, 1] > 0.8


@pytest.mark.parametrize(
    ("label", "seed", "size", "index"),
    [(6, 0, 48, 0), (-1, 0, 48, 0), (0, -1, 48, 0), (0, 0, 8, 0)],
)
def test_generate_image_rejects_bad_arguments(label: int, seed: int, size: int, index: int) -> None:
    with pytest.raises(ValueError):
        generate_image(label, seed, size, index)


def test_synthetic_defects_is_a_class_major_sequence() -> None:
    dataset = SyntheticDefects(per_class=3, seed=2, size=SMALL)
    assert len(dataset) == 18
    assert dataset.labels == [label for label in range(6) for _ in range(3)]
    assert {label for _image, label in dataset} == set(range(6))
    image, label = dataset[4]
    assert label == 1
    assert dataset.name(4) == "In_2"
    assert np.array_equal(image, generate_image(1, 2, SMALL, 1))
    assert np.array_equal(dataset[-1][0], dataset[17][0])
    assert [label for _image, label in dataset[2:5]] == [0, 1, 1]
    with pytest.raises(IndexError):
        dataset[18]
    images, labels = dataset.arrays([0, 17])
    assert images.shape == (2, SMALL, SMALL)
    assert images.dtype == np.uint8
    assert labels.tolist() == [0, 5]


def test_iter_images_cycles_through_classes_and_matches_the_data_set() -> None:
    samples = list(iter_images(seed=2, size=SMALL, count=8))
    assert [sample.label for sample in samples] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert [sample.name for sample in samples[5:8]] == ["Sc_1", "Cr_2", "In_2"]
    assert np.array_equal(samples[7].image, SyntheticDefects(3, 2, SMALL)[4][0])
    resumed = next(iter_images(seed=2, size=SMALL, start=7))
    assert np.array_equal(resumed.image, samples[7].image)


def test_split_is_stratified_disjoint_and_deterministic() -> None:
    labels = [label for label in range(6) for _ in range(20)]
    train, test = split_indices(labels, test_fraction=0.3, seed=1)
    assert sorted(train + test) == list(range(120))
    assert not set(train) & set(test)
    for label in range(6):
        assert sum(1 for i in test if labels[i] == label) == 6
    assert split_indices(labels, 0.3, seed=1) == (train, test)
    assert split_indices(labels, 0.3, seed=2) != (train, test)


def test_split_keeps_every_class_on_both_sides_when_tiny() -> None:
    train, test = split_indices([0, 0, 1, 1, 2, 2], test_fraction=0.1, seed=0)
    assert len(train) == len(test) == 3
    with pytest.raises(ValueError):
        split_indices([0, 1], test_fraction=1.5)


def _write(path: Path, pixels: npt.NDArray[np.uint8], mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


def test_load_neu_cls_prefixed_names(tmp_path: Path) -> None:
    pixels = generate_image(0, 0, 40)
    for name in ("Cr_1", "Cr_10", "Cr_2", "In_1", "Pa_1", "PS_12", "RS_3", "Sc_1"):
        _write(tmp_path / f"{name}.bmp", pixels)
    (tmp_path / "Thumbs.db").write_bytes(b"not an image, ignored")
    items = load_folder(tmp_path)
    assert [(path.name, label) for path, label in items] == [
        ("Cr_1.bmp", 0),
        ("Cr_2.bmp", 0),
        ("Cr_10.bmp", 0),
        ("In_1.bmp", 1),
        ("Pa_1.bmp", 2),
        ("PS_12.bmp", 3),
        ("RS_3.bmp", 4),
        ("Sc_1.bmp", 5),
    ]


def test_load_one_folder_per_class_by_name_or_prefix(tmp_path: Path) -> None:
    pixels = generate_image(0, 0, 40)
    _write(tmp_path / "crazing" / "a.png", pixels)
    _write(tmp_path / "rolled-in_scale" / "rolled-in_scale_4.jpg", pixels, "RGB")
    _write(tmp_path / "PS" / "PS_1.bmp", pixels)
    _write(tmp_path / "notes" / "x.png", pixels)  # not a class: ignored
    labels = sorted(label for _path, label in load_folder(tmp_path))
    assert labels == [0, 3, 4]


def test_folder_images_are_grayscale_and_resized(tmp_path: Path) -> None:
    colour = np.zeros((30, 50, 3), dtype=np.uint8)
    colour[..., 1] = 200
    path = tmp_path / "Sc_1.png"
    Image.fromarray(colour).save(path)
    image = read_image(path, size=SMALL)
    assert image.shape == (SMALL, SMALL)
    assert image.dtype == np.uint8
    dataset = FolderDefects(tmp_path, size=20)
    assert len(dataset) == 1
    assert dataset.labels == [5]
    assert dataset[0][0].shape == (20, 20)
    assert dataset.name(0) == "Sc_1"


def test_load_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        load_folder(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no images found"):
        load_folder(tmp_path)
    pixels = generate_image(0, 0, 24)

    unknown = tmp_path / "unknown"
    _write(unknown / "Xy_1.bmp", pixels)
    with pytest.raises(DatasetError, match=r"Xy_1\.bmp.*unknown class prefix 'Xy'"):
        load_folder(unknown)

    wrong_case = tmp_path / "case"
    _write(wrong_case / "ps_1.bmp", pixels)
    with pytest.raises(DatasetError, match="case-sensitive"):
        load_folder(wrong_case)

    unnamed = tmp_path / "unnamed"
    _write(unnamed / "image.png", pixels)
    with pytest.raises(DatasetError, match=r"image\.png.*cannot tell the class"):
        load_folder(unnamed)

    broken = tmp_path / "broken"
    _write(broken / "Cr_1.bmp", pixels)
    (broken / "Cr_2.bmp").write_bytes(b"BM this is not really a bitmap")
    with pytest.raises(DatasetError, match=r"Cr_2\.bmp: not a readable image"):
        load_folder(broken)
    with pytest.raises(DatasetError, match=r"Cr_2\.bmp: not a readable image"):
        read_image(broken / "Cr_2.bmp")


def test_cli_synth_writes_a_folder_that_load_folder_reads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "synthetic"
    sheet = tmp_path / "sheet.png"
    arguments = ["--out", str(out), "--per-class", "2", "--seed", "4", "--size", "32"]
    code = main(["data", "synth", *arguments, "--sheet", str(sheet)])
    assert code == 0
    assert "wrote 12 images" in capsys.readouterr().out
    assert (out / "pitted_surface" / "PS_2.png").is_file()
    items = load_folder(out)
    assert [label for _path, label in items] == [label for label in range(6) for _ in range(2)]
    for path, label in items:
        index = int(path.stem.split("_")[-1]) - 1
        assert np.array_equal(read_image(path, 32), generate_image(label, 4, 32, index))
    with Image.open(sheet) as picture:
        assert picture.mode == "L"
        assert picture.height == 6 * (32 + 4) + 4

    assert main(["data", "info", str(out)]) == 0
    report = capsys.readouterr().out
    assert "12 images" in report
    assert "one folder per class" in report
    assert "rolled-in_scale  RS       2" in report

    # Writing again into the same folder is refused rather than silently mixing sets.
    assert main(["data", "synth", "--out", str(out), "--per-class", "1", "--size", "32"]) == 1
    assert "not empty" in capsys.readouterr().err


def test_cli_info_reports_errors_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "info", str(tmp_path)]) == 1
    assert "no images found" in capsys.readouterr().err


def test_contact_sheet_has_one_row_per_class() -> None:
    sheet = contact_sheet(per_class=2, seed=0, size=24, gap=2)
    assert sheet.size == (120 + 2 * 26 + 2, 6 * 26 + 2)


def _nearest_class_mean_accuracy(
    features: npt.NDArray[np.float64], labels: npt.NDArray[np.int64], seed: int
) -> float:
    train, test = split_indices(labels.tolist(), test_fraction=0.3, seed=seed)
    scaled = (features - features[train].mean(axis=0)) / features[train].std(axis=0)
    centres = np.stack(
        [scaled[train][labels[train] == label].mean(axis=0) for label in range(len(CLASSES))]
    )
    distances = ((scaled[test][:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)
    return float((distances.argmin(axis=1) == labels[test]).mean())


def test_classes_need_more_than_brightness_but_carry_signal() -> None:
    """Mean grey level alone stays near chance; four cheap texture features do far better."""
    images, labels = SyntheticDefects(per_class=30, seed=11, size=64).arrays()
    pixels = images.astype(np.float64)
    brightness = pixels.mean(axis=(1, 2))[:, None]
    assert _nearest_class_mean_accuracy(brightness, labels, seed=0) < 0.4

    centred = (pixels - pixels.mean(axis=(1, 2), keepdims=True)) / pixels.std(
        axis=(1, 2), keepdims=True
    )
    features = np.column_stack(
        [
            np.abs(np.diff(centred, axis=2)).mean(axis=(1, 2)),  # edges across columns
            np.abs(np.diff(centred, axis=1)).mean(axis=(1, 2)),  # edges across rows
            np.percentile(centred.reshape(len(centred), -1), 1, axis=1),  # dark outliers
            np.percentile(centred.reshape(len(centred), -1), 99, axis=1),  # bright outliers
        ]
    )
    assert _nearest_class_mean_accuracy(features, labels, seed=0) > 0.45
