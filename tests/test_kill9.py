"""A real crash: ``blockkey train`` killed with SIGKILL, resumed, ends bit-identical to an uninterrupted run.

Two schedules, both reproducible: kills at seeded random moments after training starts (each
resumed run may be killed again), and kills while a checkpoint file is half written (a wrapper
makes the process SIGKILL itself right after the k-th safetensors write began). The user's recovery
is what the docs say: ``--resume`` when the run has a LATEST state, else start the run again.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from blockkey.checkpoint import load_model

from .helpers import colour_data, rand_key, with_inner, write_folder

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")]

# Runs blockkey's CLI; with KILL_AT_SAVE=k it SIGKILLs itself after writing half of the k-th tensor file.
WRAPPER = """
import os, signal, sys
import blockkey.checkpoint as ckpt
from blockkey.cli import main

at, calls, real = int(os.environ.get("KILL_AT_SAVE", "0")), [0], ckpt.save_file

def save_file(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    calls[0] += 1
    if calls[0] == at:
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

ckpt.save_file = save_file
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill9")
    write_folder(tmp / "ds", colour_data(8))
    with_inner(rand_key("shuffle,negpos", 4)).save(tmp / "k.json")  # inner: states hold folded weights and momenta
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BLOCKKEY_CACHE": str(tmp / "cache"), "KILL_AT_SAVE": "0"}
    train = ["train", "--data", str(tmp / "ds"), "--key", str(tmp / "k.json"), "--model", "fastnet"]
    train += [
        "--epochs",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "0.05",
        "--amp",
        "off",
        "--val-fraction",
        "0",
        "--ema",
        "0.9",
    ]
    return tmp, env, train


def start(setup, run, *extra, kill_at_save=0):
    _, env, train = setup
    cmd = [sys.executable, "-c", WRAPPER, *train, "-o", str(run), *extra]
    env = {**env, "KILL_AT_SAVE": str(kill_at_save)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc):
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def recover(setup, run, **kw):
    """What a user does after a crash: resume if there is a saved state, else start again."""
    if (run / "meta.json").exists() and not (run / "LATEST").exists():
        return None
    return start(setup, run, *(["--resume"] if (run / "LATEST").exists() else []), **kw)


def weights(run):
    model, _ = load_model(run)
    return model.state_dict()


def assert_identical(a, b):
    wa, wb = weights(a), weights(b)
    assert list(wa) == list(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def reference(setup):
    run = setup[0] / "reference"
    code, err = finish(start(setup, run))
    assert code == 0, err[-2000:]
    return run


def test_kill_at_seeded_random_moments_then_resume_is_bit_identical(setup, reference):
    rng = random.Random(20261129)  # the kill schedule is random but the same on every run of the test
    run = setup[0] / "random"
    proc, kills = start(setup, run), 0
    while proc is not None:
        while proc.poll() is None and not run.exists():  # the clock starts when training starts
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None and kills < 4:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        code, err = finish(proc)
        assert code in (0, -signal.SIGKILL), err[-2000:]
        assert "Traceback" not in err
        proc = recover(setup, run)
    assert kills >= 1
    assert_identical(reference, run)
    assert not list(run.glob("**/.*.tmp*"))  # nothing half-written is left behind
    assert not (run / "LATEST").exists() and not list(run.glob("state-*"))


@pytest.mark.parametrize("save", [1, 4, 7])  # state-0001's weights, state-0002's optimizer, the final weights
def test_kill_while_a_checkpoint_is_half_written_then_resume_is_bit_identical(setup, reference, save):
    run = setup[0] / f"save{save}"
    code, _ = finish(start(setup, run, kill_at_save=save))
    assert code == -signal.SIGKILL
    assert list(run.glob("**/.*.tmp*")), "the kill came while a temporary file was being written"
    proc = recover(setup, run)
    code, err = finish(proc)
    assert code == 0 and "Traceback" not in err, err[-2000:]
    assert_identical(reference, run)
    assert not list(run.glob("**/.*.tmp*"))  # nothing half-written is left behind
