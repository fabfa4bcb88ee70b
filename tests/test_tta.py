"""Test-time views (blockkey.tta) and their weighted average (blockkey.runtime.predict_views)."""

from __future__ import annotations

import pytest
import torch

from blockkey.errors import OptionError
from blockkey.runtime import predict_views
from blockkey.tta import TTA_MODES, Views, tta_views


def test_views_are_mirrors_and_one_pixel_moves_with_zero_fill():
    x = torch.arange(1, 2 * 3 * 4 * 5 + 1, dtype=torch.uint8).view(2, 3, 4, 5)
    views = tta_views("shift")
    assert views is not None and len(views.offsets) == 10 and views.weights == (1, 1) + (0.5,) * 8
    for (dy, dx, mirror), got in zip(views.offsets, views.images(x), strict=True):
        src = x.flip(-1) if mirror else x
        want = torch.zeros_like(src)  # out[i, j] = src[i - dy, j - dx] where that exists, else 0
        for i in range(4):
            for j in range(5):
                if 0 <= i - dy < 4 and 0 <= j - dx < 5:
                    want[..., i, j] = src[..., i - dy, j - dx]
        assert torch.equal(got, want)
    flip = tta_views(True)
    assert flip is not None and flip.name == "flip" and [v.shape for v in flip.images(x)] == [x.shape] * 2
    assert tta_views("off") is None and tta_views(False) is None and tta_views(None) is None
    assert set(TTA_MODES) == {"off", "flip", "shift"}
    with pytest.raises(OptionError, match="tta must be one of off, flip, shift"):
        tta_views("rotate")
    with pytest.raises(OptionError, match="one non-negative weight per view"):
        Views("bad", ((0, 0, False),), (1.0, 1.0))


def test_predict_views_is_the_weighted_mean_of_the_softmax_outputs():
    """A 'model' whose logits are its input: the result is log(sum_v w_v softmax(x_v) / sum w), computed here
    view by view; each view runs as its own channels_last batch when asked."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 6, 1, 1, generator=g)  # (B, V, C, H, W): 6 "classes"
    seen = []

    def model(batch):
        seen.append((batch.shape, batch.is_contiguous(memory_format=torch.channels_last)))
        return batch.flatten(1)

    weights = (2.0, 1.0, 0.5)
    got = predict_views(model, x, weights, channels_last=True)
    want = sum(w * x[:, v].flatten(1).softmax(1) for v, w in enumerate(weights)) / sum(weights)
    torch.testing.assert_close(got, want.log())
    assert seen == [(torch.Size([4, 6, 1, 1]), True)] * 3
    torch.testing.assert_close(predict_views(model, x), (x.flatten(2).softmax(2).mean(1)).log())
    plain = torch.randn(4, 6, 1, 1, generator=g)
    assert torch.equal(predict_views(model, plain), plain.flatten(1))  # one view: the logits themselves
    with pytest.raises(ValueError, match="3 views but 2 weights"):
        predict_views(model, x, (1.0, 1.0))
