"""VGG-16's first classifier layer split by the rows of the map it reads.

Every split of the last map's rows, summed in tile order, equals the whole layer; the
weights are laid out once per model and read in place for any split (a new plan's row
ranges cost no copy); a model whose head cannot be split says so.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from edgedi.models import head_split
from edgedi.models.head_split import head_partial, prepare_head_split
from edgedi.models.zoo import ZooModel, build_model

SIZE = 96  # the last map has 3 rows


@pytest.fixture(scope="module")
def vgg() -> ZooModel:
    return build_model("vgg16", SIZE, seed=3)


def _first_linear(model: ZooModel) -> tuple[torch.nn.Linear, tuple[int, int, int]]:
    unit, op = head_split._first_linear(model)
    return op.linear, model.spec.units[unit].in_shape


def _splits(height: int) -> list[list[tuple[int, int]]]:
    """Every way to cut `height` rows into consecutive non-empty strips."""
    result = []
    for cuts in itertools.product((False, True), repeat=height - 1):
        bounds = [0, *(row + 1 for row, cut in enumerate(cuts) if cut), height]
        result.append(list(itertools.pairwise(bounds)))
    return result


def test_every_row_split_sums_to_the_whole_layer(vgg: ZooModel) -> None:
    linear, (channels, height, width) = _first_linear(vgg)
    x = torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = (x.reshape(1, -1) @ linear.weight.T).double().numpy()
    splits = _splits(height)
    assert len(splits) == 2 ** (height - 1)
    for split in splits:
        total = np.zeros_like(whole)
        for rows in split:
            total += head_partial(vgg, rows, x[:, :, rows[0] : rows[1], :].contiguous())
        np.testing.assert_allclose(total, whole, rtol=1e-5, atol=1e-5)


def test_the_weights_are_laid_out_once_and_read_in_place(vgg: ZooModel) -> None:
    assert prepare_head_split(vgg)
    laid_out = head_split._by_rows[vgg]
    _, (channels, height, width) = _first_linear(vgg)
    for rows in [(0, 1), (1, 3), (0, height)]:
        x = torch.zeros(1, channels, rows[1] - rows[0], width)
        head_partial(vgg, rows, x)
        assert head_split._by_rows[vgg] is laid_out  # no copy per row range


def test_a_model_without_a_linear_head_on_the_map_is_not_prepared() -> None:
    model = build_model("tiny", 48, seed=0)
    assert not prepare_head_split(model)
    with pytest.raises(ValueError, match="no head"):
        head_partial(model, (0, 1), torch.zeros(1, 1, 1, 1))


def test_rows_that_do_not_fit_the_map_are_refused(vgg: ZooModel) -> None:
    _, (channels, height, width) = _first_linear(vgg)
    with pytest.raises(ValueError, match="expected"):
        head_partial(vgg, (0, height + 1), torch.zeros(1, channels, height + 1, width))
    with pytest.raises(ValueError, match="expected"):
        head_partial(vgg, (0, 1), torch.zeros(1, channels, 2, width))
