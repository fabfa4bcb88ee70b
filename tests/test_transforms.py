from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

from blockkey import KeyedTransform, ShapeError
from blockkey import functional as F

from .helpers import DEVICES, images, rand_key


class TestKeyedTransform:
    def test_matches_functional(self):
        key = rand_key("shuffle,negpos,ffx", 4)
        t = KeyedTransform(key)
        x = images(3, 3, 16, 8)
        plan = F.compile_plan(key, (16, 8))
        assert torch.equal(t(x), F.encrypt(x, plan))
        assert torch.equal(t.encode(x), F.encrypt_codes(x, plan))
        assert torch.equal(t.inverse(t(x)), x) and torch.equal(t.decode(t.encode(x)), x)

    def test_no_key_material_in_state_dict_or_repr(self):
        key = rand_key("shuffle,negpos,ffx", 4)
        model = nn.Sequential(KeyedTransform(key), nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
        assert all(not k.startswith("0.") for k in model.state_dict())
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        assert key.steps[2].password.encode() not in buf.getvalue()
        text = repr(model)
        assert key.fingerprint in text and "password" not in text

    def test_several_sizes_and_pickle(self):
        t = KeyedTransform(rand_key("shuffle,negpos", 2))
        for h, w in [(4, 4), (8, 6)]:
            x = images(2, 3, h, w)
            assert torch.equal(t.inverse(t(x)), x)
        t2 = pickle.loads(pickle.dumps(t))
        x = images(1, 3, 4, 4)
        assert torch.equal(t2(x), t(x))

    def test_differentiable_inverse(self):
        t = KeyedTransform(rand_key("negpos,shuffle", 2))
        x = torch.rand(2, 3, 4, 4, requires_grad=True)
        t.inverse_float(t(x)).sum().backward()
        assert torch.allclose(x.grad, torch.ones_like(x))

    def test_channel_mismatch(self):
        t = KeyedTransform(rand_key("shuffle", 4, channels=3))
        with pytest.raises(ShapeError, match="3-channel images; got 1"):
            t(images(1, 1, 8, 8))

    @pytest.mark.parametrize("device", DEVICES)
    def test_to_device(self, device):
        key = rand_key("shuffle,negpos,ffx", 4)
        t = KeyedTransform(key).to(device)
        x = images(4, 3, 8, 8)
        y = t(x.to(device))
        assert y.device.type == device
        assert torch.equal(y.cpu(), KeyedTransform(key)(x))
        assert torch.equal(t.inverse(y).cpu(), x)
