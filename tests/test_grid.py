"""The labelled-grid node's logic: layout, labels, errors (no ComfyUI)."""

from __future__ import annotations

import pytest
import torch

from hypernet.errors import LoraRarError
from hypernet.nodelogic.grid import grid_shape, labelled_grid, parse_labels


def batch(count: int, height: int = 48, width: int = 64) -> torch.Tensor:
    """Images of one saturated colour each (grey text and its anti-aliasing never are), so each
    tile can be found in the grid."""
    palette = torch.tensor([[1.0, 0, 0], [0, 0.8, 0], [0, 0, 1.0], [1.0, 0, 1.0], [0, 1.0, 1.0], [1.0, 0.6, 0]])
    return palette[torch.arange(count) % len(palette)].reshape(count, 1, 1, 3).expand(count, height, width, 3).clone()


def test_labels_one_per_line_or_comma_separated():
    assert parse_labels("lorarar, np-lora,k-lora , sum") == ["lorarar", "np-lora", "k-lora", "sum"]
    assert parse_labels("a, b\nc\n\n") == ["a, b", "c"]
    assert parse_labels("  ") == []


@pytest.mark.parametrize(("count", "columns", "shape"), [(4, 0, (2, 2)), (3, 0, (2, 2)), (5, 0, (2, 3)),
                                                         (4, 4, (1, 4)), (4, 9, (1, 4)), (1, 0, (1, 1))])
def test_grid_shape(count, columns, shape):
    assert grid_shape(count, columns) == shape


def test_every_image_lands_in_its_cell_under_a_label():
    images = batch(4)
    grid = labelled_grid(images, "lorarar, np-lora, k-lora, sum", columns=2)
    assert grid.shape[0] == 1 and grid.shape[-1] == 3
    height, width = grid.shape[1:3]
    assert width > 2 * 64 and height > 2 * 48
    # each tile's colour appears exactly as a 64×48 block somewhere in the grid
    for index in range(4):
        colour = images[index, 0, 0]
        match = (grid[0] - colour).abs().amax(dim=-1) < 1 / 255
        assert int(match.sum()) == 64 * 48, index
    # the label bands carry ink (text), not only background
    top_band = grid[0, : height // 4]
    assert float((top_band < 0.5).float().mean()) > 0.001


def test_label_count_must_match():
    with pytest.raises(LoraRarError, match=r"labels: 3 label\(s\) for 4 image\(s\)"):
        labelled_grid(batch(4), "a, b, c")


def test_not_an_image_batch_is_refused():
    with pytest.raises(LoraRarError, match="images: expected an IMAGE batch"):
        labelled_grid(torch.zeros(4, 4), "a")


def test_long_labels_are_shortened_to_the_tile():
    grid = labelled_grid(batch(1, 32, 40), "a very long label that cannot fit into forty pixels")
    assert grid.shape[2] < 60
