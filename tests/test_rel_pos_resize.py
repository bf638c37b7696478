"""Relative position table resizing: the original BEiT geometric scheme and the uniform modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastbeit.classifier import (
    geometric_ratio,
    geometric_source_axis,
    geometric_target_axis,
    resize_rel_pos_table,
    table_grid,
)
from fastbeit.errors import UserError

CLS_ROWS = [[5.0, -6.0], [7.0, 8.5], [-9.0, 10.0]]


def cubic(dy: np.ndarray, dx: np.ndarray, head: int) -> np.ndarray:
    """Degree 3 in each axis, O(1) on offsets up to ±23, and not symmetric, so a swapped or flipped axis shows up."""
    y, x = dy / 23, dx / 23
    return 0.3 + head + 0.8 * y**3 - 0.5 * y * x + 0.6 * x**2 - 0.4 * x**3 * y + 0.7 * x


def table_from(fn, axis: np.ndarray, heads: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``fn(dy, dx, head)`` sampled on ``axis`` × ``axis`` (rows dy, columns dx), plus 3 CLS rows."""
    dy, dx = np.meshgrid(axis, axis, indexing="ij")
    values = np.stack([fn(dy, dx, h).ravel() for h in range(heads)], axis=-1)
    return torch.cat((torch.from_numpy(values), torch.tensor(CLS_ROWS, dtype=torch.float64)[:, :heads])).to(dtype)


def test_geometric_ratio_and_source_axis_for_224_to_384():
    q = geometric_ratio(27, 47)
    assert 1.01 < q < 1.5
    assert (1 - q**13) / (1 - q) == pytest.approx(23, abs=1e-4)  # 13 terms reach T//2
    axis = geometric_source_axis(27, 47)
    assert axis.shape == (27,) and axis[13] == 0 and axis[14] == 1
    np.testing.assert_array_equal(axis, -axis[::-1])
    assert np.all(np.diff(axis) > 0)
    assert axis[-1] == pytest.approx(23, abs=1e-4)
    np.testing.assert_allclose(np.diff(axis[13:]), q ** np.arange(13), rtol=1e-12)  # spacing 1, q, q^2, ...
    np.testing.assert_array_equal(geometric_target_axis(47), np.arange(-23.0, 24.0))


def test_shrinking_pins_the_ratio_at_the_lower_bound():
    assert geometric_ratio(47, 27) == pytest.approx(1.01, abs=1e-5)
    assert geometric_source_axis(47, 27)[-1] > 13  # every target offset lies inside the source range


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_geometric_resize_reproduces_a_bicubic_polynomial(dtype, tol):
    src = geometric_source_axis(27, 47)
    table = table_from(cubic, src, dtype=dtype)
    new = resize_rel_pos_table(table, (24, 24))
    assert new.shape == (47 * 47 + 3, 2) and new.dtype == dtype
    # FITPACK clamps a target past the outermost source offset (23 vs 22.99993) to the edge, as interp2d did
    dst = np.clip(geometric_target_axis(47), src[0], src[-1])
    expected = table_from(cubic, dst, dtype=torch.float64)
    torch.testing.assert_close(new.double(), expected, rtol=0, atol=tol)


def test_geometric_resize_keeps_the_centre_and_the_cls_rows():
    torch.manual_seed(0)
    table = torch.randn(27 * 27 + 3, 4)
    new = resize_rel_pos_table(table, (24, 24))
    torch.testing.assert_close(new[:-3].reshape(47, 47, 4)[23, 23], table[:-3].reshape(27, 27, 4)[13, 13])
    torch.testing.assert_close(new[-3:], table[-3:], rtol=0, atol=0)
    assert resize_rel_pos_table(table, (14, 14)) is table


def test_geometric_shrink_runs_and_keeps_the_centre():
    torch.manual_seed(0)
    table = torch.randn(47 * 47 + 3, 3, dtype=torch.bfloat16)
    new = resize_rel_pos_table(table, (14, 14))
    assert new.shape == (27 * 27 + 3, 3) and new.dtype == torch.bfloat16 and table_grid(new.shape[0]) == (14, 14)
    assert torch.equal(new[:-3].reshape(27, 27, 3)[13, 13], table[:-3].reshape(47, 47, 3)[23, 23])
    assert torch.equal(new[-3:], table[-3:])


def test_non_square_small_and_unknown_modes_are_refused():
    table = torch.zeros(15 * 15 + 3, 2)
    with pytest.raises(UserError, match="square patch grid.*bicubic"):
        resize_rel_pos_table(table, (12, 10))
    assert resize_rel_pos_table(table, (12, 10), "bicubic").shape == (23 * 19 + 3, 2)
    with pytest.raises(UserError, match="at least 3x3"):
        resize_rel_pos_table(torch.zeros(9 + 3, 2), (6, 6))
    with pytest.raises(UserError, match="unknown relative position interpolation"):
        resize_rel_pos_table(table, (12, 12), "nearest")
