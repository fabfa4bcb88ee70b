from __future__ import annotations

import random

import pytest
import torch

from blockkey.attacks import Target
from blockkey.checkpoint import load_model
from blockkey.data import stratified_split
from blockkey.train import TrainConfig, fit

from .helpers import colour_data, rand_key


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    # Test data only: keys themselves never come from these generators.
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory):
    """A patchnet trained one epoch on a toy set: enough to compare two paths to the same attack."""
    tmp = tmp_path_factory.mktemp("tiny-target")
    train, val = stratified_split(colour_data(8, size=16), 0.25, 0)
    key = rand_key("shuffle,negpos", 4, seed=2)
    cfg = TrainConfig(model="patchnet", model_kwargs={"patch": 4, "width": 0.25}, epochs=1, batch_size=8, amp="off")
    fit(train, val, key, cfg, tmp / "run", progress=False, log=lambda s: None)
    model, meta = load_model(tmp / "run")
    return Target(model, meta, key, val), train
