"""Finetuning: the task mix follows its weights, loss falls only on targets, every task's
validation loss falls on real data, and a stopped finetune resumes exactly."""
import json
import os

import numpy as np
import pytest
import torch

import finetune
import prepare_finetune
from common import EOT, UserError
from data import FinetuneMixture, loss_mask
from model import GPT, GPTConfig

from conftest import stop_after

BLOCK = 256


class FakeSplit:
    """Examples whose tokens name their task: prompt = [task] * 3, target = [100 + task] * 2 + EOT."""

    def __init__(self, task, n=50):
        self.task, self.n = task, n

    def __len__(self):
        return self.n

    def example(self, i):
        return np.array([self.task] * 3 + [100 + self.task] * 2 + [EOT]), 3


def test_task_sampling_follows_the_weights():
    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    splits = {name: FakeSplit(i) for i, name in enumerate(weights)}
    mix = FinetuneMixture(splits, weights, block_size=60, batch_size=8, seed=0)
    counts = np.zeros(3)
    for step in range(100):
        x = mix.batch(step, 0)[0]
        starts = torch.cat([torch.ones(8, 1, dtype=torch.bool), x[:, :-1] == EOT], 1) & (x < 3)
        counts += np.bincount(x[starts].numpy(), minlength=3)
    expected = np.array([1, 2, 5]) / 8
    n = counts.sum()
    # each share within 4 standard deviations of a multinomial draw of n examples
    assert n > 5000 and np.all(np.abs(counts / n - expected) < 4 * np.sqrt(expected * (1 - expected) / n))


def test_loss_mask_covers_exactly_targets_and_their_eot():
    mix = FinetuneMixture({"a": FakeSplit(7)}, {"a": 1.0}, block_size=20, batch_size=2, seed=0)
    batch = mix.batch(0, 0)
    x, y, mask = batch[0], batch[1], loss_mask(batch)
    assert torch.equal(x[:, 1:], y[:, :-1])
    # 3 whole examples of 6 tokens fit in 21 positions; the rest is padding without loss
    assert y[0][mask[0]].tolist() == [107, 107, EOT] * 3
    assert not mask[0][17:].any()


def test_replay_rows_carry_loss_everywhere(tmp_path):
    from data import TokenWindows
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "owt.bin")
    replay = TokenWindows(str(tmp_path / "owt.bin"), 20, 4, seed=0)
    mix = FinetuneMixture({"a": FakeSplit(1)}, {"a": 1.0}, 20, 64, 0, replay=replay, replay_fraction=0.25)
    rows = [mix.batch(s, 0) for s in range(5)]
    full = sum(int(loss_mask(b).all(1).sum()) for b in rows)
    assert 0.1 < full / (5 * 64) < 0.4


def test_unknown_task_weight_is_a_clear_error():
    cfg = finetune.FinetuneConfig(task_weights="squad:1,glue:2")
    with pytest.raises(UserError, match="task_weights names 'glue', which is not in tasks"):
        finetune.task_weights(cfg, ["squad", "sst2"], {"squad": 10, "sst2": 10})
    cfg = finetune.FinetuneConfig(mix_cap=100)
    assert finetune.task_weights(cfg, ["squad", "sst2"], {"squad": 1000, "sst2": 40}) == {"squad": 100, "sst2": 40}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shared_data):
    """Real prepared task data (40 rows per split) and a randomly initialised tiny model."""
    root = tmp_path_factory.mktemp("ft")
    prepare_finetune.main(["--data-root", str(shared_data), "--out-dir", str(root / "tasks"),
                           "--block-size", str(BLOCK), "--limit", "40", "--num-proc", "1"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=BLOCK, n_layer=1, n_head=2, n_embd=32))
    torch.save({"model": model.state_dict(), "model_config": vars(model.config)}, root / "init.pt")
    return root


def args(ws, out, *extra):
    return ["config/finetune_smoke.py", f"--init_from={ws}/init.pt", f"--finetune_dir={ws}/tasks",
            f"--out_dir={ws}/{out}", "--replay_fraction=0", "--batch_size=2", "--log_interval=1", *extra]


def evals(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == "eval"]


def test_short_finetune_on_real_data_lowers_every_task_loss(workspace):
    finetune.main(args(workspace, "run", "--max_iters=30", "--eval_interval=30", "--learning_rate=3e-3"))
    first, last = evals(workspace / "run")[0], evals(workspace / "run")[-1]
    for task in ("cnn_dailymail", "squad", "sst2"):
        assert last[f"val/{task}"] < first[f"val/{task}"] - 0.5, (task, first, last)
    model = torch.load(workspace / "run" / "model.pt", weights_only=False)
    assert model["tasks_version"] == 1 and model["val_losses"].keys() == {"cnn_dailymail", "squad", "sst2"}


def test_stopped_finetune_resumes_exactly(workspace, monkeypatch):
    extra = ("--max_iters=8", "--eval_interval=4", "--dropout=0.1")
    finetune.main(args(workspace, "full", *extra))
    with monkeypatch.context() as m:
        stop_after(m, 3)
        with pytest.raises(SystemExit):
            finetune.main(args(workspace, "cut", *extra))
    finetune.main(args(workspace, "cut", *extra, "--resume"))
    full = torch.load(workspace / "full" / "ckpt.pt", weights_only=False)["model"]
    cut = torch.load(workspace / "cut" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_checkpoint_that_does_not_fit_is_a_clear_error(workspace):
    with pytest.raises(UserError, match="init.pt does not fit the configured model"):
        finetune.main(args(workspace, "bad", "--n_embd=64"))
    with pytest.raises(UserError, match="checkpoint .*missing.pt not found"):
        finetune.main(args(workspace, "bad", f"--init_from={workspace}/missing.pt"))


def test_data_prepared_for_a_larger_block_is_a_clear_error(workspace, tmp_path):
    torch.manual_seed(0)
    small = GPT(GPTConfig(block_size=128, n_layer=1, n_head=2, n_embd=32))
    torch.save({"model": small.state_dict(), "model_config": vars(small.config)}, tmp_path / "small.pt")
    with pytest.raises(UserError, match="prepared for block_size 256 but the model has 128; rerun"):
        finetune.main(args(workspace, "bad", f"--init_from={tmp_path}/small.pt"))
