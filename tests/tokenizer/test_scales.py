"""ScaleLayout: the one owner of the next-scale offsets arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenflow_cli.tokenizer.scales import ScaleLayout


def test_offsets_and_spans_match_a_hand_count():
    layout = ScaleLayout((1, 2, 4))
    assert layout.offsets == (0, 1, 5, 21) and layout.num_tokens == 21 and layout.sizes == (1, 4, 16)
    assert [layout.span(k) for k in range(3)] == [slice(0, 1), slice(1, 5), slice(5, 21)]


def test_maps_round_trip_torch_and_numpy():
    layout = ScaleLayout((1, 2, 3))
    idx = torch.arange(2 * layout.num_tokens).reshape(2, -1)
    maps = layout.maps(idx)
    assert [tuple(m.shape) for m in maps] == [(2, 1, 1), (2, 2, 2), (2, 3, 3)]
    assert torch.equal(torch.cat([m.reshape(2, -1) for m in maps], 1), idx)
    assert np.array_equal(layout.maps(idx.numpy())[2], maps[2].numpy())


def test_split_accepts_prefixes_only():
    layout = ScaleLayout((1, 2, 4))
    assert [t.shape[1] for t in layout.split(torch.zeros(3, 5, dtype=torch.long))] == [1, 4]
    with pytest.raises(ValueError, match="prefix"):
        layout.split(torch.zeros(3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="L=21"):
        layout.maps(torch.zeros(1, 20))


def test_rejects_non_positive_sides():
    with pytest.raises(ValueError):
        ScaleLayout((1, 0, 2))
