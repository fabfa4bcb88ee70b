"""timm models as timm_<name>: patch size = the key's block size, convert / rekey on the patch embedding."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from blockkey import BlockkeyError
from blockkey.checkpoint import load_model
from blockkey.cli import main
from blockkey.data import Normalize, stratified_split
from blockkey.evaluate import evaluate_run
from blockkey.models import block_aligned, create_model, patch_embedding, size_kwargs
from blockkey.predict import Predictor
from blockkey.rekey import convert_run, logit_error, rekey_model
from blockkey.train import TrainConfig, fit

from .helpers import colour_data, rand_key, write_folder

timm = pytest.importorskip("timm")

TINY = {
    "timm_vit_tiny_patch16_224": {"depth": 2, "image_size": 16},
    "timm_deit_tiny_patch16_224": {"depth": 1, "image_size": 16},
    "timm_beit_base_patch16_224": {"depth": 1, "embed_dim": 32, "num_heads": 2, "image_size": 16},
}


@pytest.mark.parametrize("name", list(TINY))
def test_patch_is_the_block_size_and_rekey_is_exact(name):
    assert block_aligned(name)
    torch.manual_seed(0)
    model = create_model(name, 5, 3, patch=4, **TINY[name]).eval()
    conv = patch_embedding(model)
    assert conv is not None and conv.kernel_size == (4, 4) and conv.stride == (4, 4)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 5)
    norm = Normalize((0.5, 0.45, 0.4), (0.25, 0.25, 0.25))
    k1, k2 = rand_key("shuffle,negpos", 4, seed=1), rand_key("negpos,shuffle", 4, seed=2)
    protected, pnorm = rekey_model(model, norm, None, k1)
    assert logit_error(model, norm, None, protected, pnorm, k1, (3, 16, 16)) < 1e-9
    moved, mnorm = rekey_model(protected, pnorm, k1, k2)
    assert logit_error(protected, pnorm, k1, moved, mnorm, k2, (3, 16, 16)) < 1e-9
    assert logit_error(model, norm, None, moved, mnorm, k1, (3, 16, 16)) > 1e-3  # a wrong key changes the logits


def test_size_kwargs_and_refusals(monkeypatch):
    assert size_kwargs("timm_vit_tiny_patch16_224", (3, 32, 48)) == {"image_size": [32, 48]}
    assert size_kwargs("timm_resnet18", (3, 32, 32)) == {} and not block_aligned("timm_convmixer_768_32")
    assert size_kwargs("patchnet", (3, 32, 32)) == {}
    assert not block_aligned("timm_resnet18")
    assert create_model("timm_resnet18", 4, 1).eval()(torch.rand(1, 1, 16, 16)).shape == (1, 4)
    with pytest.raises(BlockkeyError, match="no patch embedding"):
        create_model("timm_resnet18", 4, 3, patch=4)
    with pytest.raises(BlockkeyError, match="unknown timm model"):
        create_model("timm_no_such_net", 4)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "timm" else real(n, *a))
    with pytest.raises(BlockkeyError, match=r"pip install 'blockkey\[timm\]'"):
        create_model("timm_vit_tiny_patch16_224", 4)


@pytest.mark.slow
def test_run_convert_predict(tmp_path):
    data = colour_data(8, size=16)
    tr, va = stratified_split(data, 0.25, 0)
    kwargs = {"patch": 4, "image_size": 16, "depth": 2}
    cfg = TrainConfig(model="timm_vit_tiny_patch16_224", model_kwargs=kwargs, epochs=1, batch_size=8, amp="off")
    fit(tr, va, None, cfg, tmp_path / "plain", progress=False, log=lambda s: None)
    key = rand_key("shuffle,negpos", 4, seed=4)
    convert_run(tmp_path / "plain", key, tmp_path / "prot")
    plain = evaluate_run(tmp_path / "plain", va, None, progress=False, wrong_keys=0).rows[0]["accuracy"]
    prot = evaluate_run(tmp_path / "prot", va, key, progress=False, wrong_keys=0).rows[0]["accuracy"]
    assert prot == pytest.approx(plain)
    model, meta = load_model(tmp_path / "prot")
    assert meta["model_kwargs"] == kwargs and type(model).__module__.startswith("timm.")
    p = Predictor(tmp_path / "prot", key)
    assert len(p(list(va.images))) == len(va)


@pytest.mark.slow
def test_cli_train_sets_patch_and_image_size(tmp_path, capsys):
    root = write_folder(tmp_path / "ds", colour_data(4, size=16))
    rand_key("shuffle,negpos,ffx", 4, seed=5).save(tmp_path / "key.json")
    argv = ["train", "--data", str(root), "--model", "timm_deit_tiny_patch16_224", "--key", str(tmp_path / "key.json")]
    assert main([*argv, "--epochs", "1", "--batch-size", "4", "--amp", "off", "-o", str(tmp_path / "run")]) == 0
    _, meta = load_model(tmp_path / "run")
    assert meta["model_kwargs"] == {"patch": 4, "image_size": 16}
    assert "timm_deit_tiny_patch16_224" in (tmp_path / "run" / "README.md").read_text()
    assert main([*argv, "--pretrained", "--model", "fastnet", "-o", str(tmp_path / "x")]) == 2
    assert "--pretrained takes a timm" in capsys.readouterr().err


def _cached_weights(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return False
    return any(
        isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in ("model.safetensors", "pytorch_model.bin")
    )


def test_pretrained_where_weights_are_present():
    name = "vit_tiny_patch16_224"
    if not _cached_weights(name):
        pytest.skip("no pretrained timm weights on this machine (nothing can be downloaded here)")
    torch.manual_seed(0)
    random_init = create_model(f"timm_{name}", 10, 3, patch=16, image_size=224)
    pre = create_model(f"timm_{name}", 10, 3, patch=16, image_size=224, pretrained=True)
    assert not torch.equal(patch_embedding(pre).weight, patch_embedding(random_init).weight)
