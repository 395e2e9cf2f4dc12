import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data():
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not beside the repository")
    return path


# Tiny test models gain nothing from more threads, and OpenMP threads that share a core with
# another busy process slow down by orders of magnitude.
torch.set_num_threads(1)


# a tiny model on the smoke preset, for tests of the training loop
TINY = ["config/pretrain_smoke.py", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32",
        "--batch_size=2", "--eval_iters=2", "--log_interval=1"]


@pytest.fixture
def corpus(tmp_path):
    """A small learnable token stream (a repeated random pattern) as train.bin / val.bin."""
    rng = np.random.default_rng(0)
    data = np.tile(rng.integers(0, 300, size=37), 300).astype(np.uint16)
    data.tofile(tmp_path / "train.bin")
    data[:2000].tofile(tmp_path / "val.bin")
    return tmp_path


def stop_after(monkeypatch, steps):
    """Make the training loop stop (checkpoint, SystemExit) after `steps` optimizer steps, as a
    SIGTERM would; use inside `with monkeypatch.context() as m`."""
    import trainer
    calls = {"n": 0}

    def agreed(self, rt):
        calls["n"] += 1
        return calls["n"] == steps

    monkeypatch.setattr(trainer.StopFlag, "agreed", agreed)


def stopped_and_resumed(monkeypatch, args, out_dir, steps):
    """Train.py with args into out_dir, stopped after `steps` steps (as by SIGTERM) and resumed:
    the final ckpt.pt."""
    import train
    with monkeypatch.context() as m:
        stop_after(m, steps)
        with pytest.raises(SystemExit):
            train.main(args + [f"--out_dir={out_dir}"])
    assert torch.load(out_dir / "ckpt.pt", weights_only=False)["iter_num"] == steps
    train.main(args + [f"--out_dir={out_dir}", "--resume"])
    return torch.load(out_dir / "ckpt.pt", weights_only=False)
