"""ffx-all recipes, identity normalisation and the lookup-table stem (tablenet)."""

from __future__ import annotations

import torch

from blockkey import KeyedTransform, KeySet
from blockkey.data import ImageTensors, Normalize
from blockkey.functional import compile_block_plan
from blockkey.models import TableEmbed, create_model

from .helpers import images


def test_ffx_all_recipe_encrypts_every_position_and_its_mask_carries_no_key_bits():
    key = KeySet.generate("shuffle,negpos,ffx-all", 4)
    ffx = key.steps[2]
    assert all(ffx.mask) and key.recipe == ("shuffle", "negpos", "ffx") and key.spec == ("shuffle", "negpos", "ffx-all")
    bits = dict(key.key_space_bits())
    assert bits["ffx"] == KeySet.generate("ffx-all", 4).key_space_total()  # password only
    assert KeySet.generate("ffx", 4).key_space_total() > bits["ffx"] + 40  # a random mask adds L = 48 bits
    again = KeySet.from_seed(7, key.spec, 4)
    assert again.spec == key.spec and all(again.steps[2].mask)
    plan = compile_block_plan(key)
    assert (plan.domain == 999).all()  # no position left in the clear


def test_identity_normalisation():
    data = ImageTensors(images(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), ("a",))
    norm = Normalize.fit(data, None, "none")
    mean, std = norm.tensors((3, 8, 8), "cpu")
    assert norm.mode == "none" and mean.eq(0).all() and std.eq(1).all()
    assert Normalize.from_json(norm.to_json()) == norm


def test_table_stem_is_a_lookup_summed_over_the_block():
    torch.manual_seed(0)
    stem = TableEmbed(3, 4, dim=5, value_dim=2)
    x = images(2, 3, 8, 8)
    out = stem(x.float() / 255)
    # Reference: per block, per position k (row, col, channel order), look up table[k, bin(v)].
    w, mix = stem.table.weight, stem.mix.weight
    for b in range(2):
        for gr in range(2):
            for gc in range(2):
                block = x[b, :, 4 * gr : 4 * gr + 4, 4 * gc : 4 * gc + 4].permute(1, 2, 0).reshape(-1)
                bins = torch.round(block.double() * 999 / 255).long()
                values = torch.cat([w[k * 1000 + int(bins[k])] for k in range(48)])
                torch.testing.assert_close(out[b, :, gr, gc], mix @ values)


def test_keyed_tablenet_is_a_relabelled_plain_tablenet():
    """For any key (FFX on every position included) there is a tablenet T' with T'(key(x)) == T(x):
    its table rows and mixing columns are those of T, relabelled. Training on keyed images is therefore
    distributed exactly like plain training (the init is exchangeable over rows and positions)."""
    torch.manual_seed(0)
    key = KeySet.from_seed(3, "shuffle,negpos,ffx-all,shuffle", 4)
    plan = compile_block_plan(key)
    plain = create_model("tablenet", 10, patch=4, width=0.125, value_dim=2).eval()
    keyed = create_model("tablenet", 10, patch=4, width=0.125, value_dim=2).eval()
    keyed.load_state_dict(plain.state_dict())
    t, tk = plain.embed[0], keyed.embed[0]
    d = t.value_dim
    with torch.no_grad():
        for k in range(48):
            src = int(plan.src[k])
            for v in range(256):
                code = int(plan.codes[k, v])
                code_bin = code if int(plan.domain[k]) == 999 else round(code * 999 / 255)
                tk.table.weight[k * 1000 + code_bin] = t.table.weight[src * 1000 + round(v * 999 / 255)]
            tk.mix.weight[:, k * d : (k + 1) * d] = t.mix.weight[:, src * d : (src + 1) * d]
    x = images(6, 3, 16, 16)
    torch.testing.assert_close(keyed(KeyedTransform(key)(x)), plain(x.float() / 255))
