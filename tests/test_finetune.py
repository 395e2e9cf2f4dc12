"""Finetuning: the task mix and the loss follow their weights, loss falls only on targets, model.pt
is chosen on a slice held out of train (never a reported split), every task's held-out loss falls
on real data, and a stopped finetune resumes exactly."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import finetune
import prepare_finetune
import tasks
from common import EOT, UserError, get_tokenizer
from data import FinetuneMixture, loss_mask
from model import GPT, GPTConfig

from conftest import ROOT, stop_after

BLOCK = 256


class FakeSplit:
    """Examples whose tokens name their task: prompt = [task] * 3, target = [100 + task] * k + EOT."""

    def __init__(self, task, n=50, target_len=2):
        self.task, self.n, self.target_len = task, n, target_len
        self.index = np.array([[0, 3, 4 + target_len]] * n)  # (offset, prompt length, length), as prepared

    def __len__(self):
        return self.n

    def example(self, i):
        return np.array([self.task] * 3 + [100 + self.task] * self.target_len + [EOT]), 3


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


def test_realised_mix_counts_the_examples_the_batches_really_hold():
    mix = FinetuneMixture({"a": FakeSplit(1), "b": FakeSplit(2)}, {"a": 1.0, "b": 3.0}, block_size=60, batch_size=4,
                          seed=0)
    realised = finetune.realised_mix(mix, min_examples=500)
    counts = np.zeros(3)
    for step in range(realised["batches"]):
        x = mix.batch(step, 0)[0]
        starts = torch.cat([torch.ones(4, 1, dtype=torch.bool), x[:, :-1] == EOT], 1) & (x < 3)
        counts += np.bincount(x[starts].numpy(), minlength=3)
    assert realised["examples"] == {"a": counts[1], "b": counts[2]} and counts.sum() >= 500
    assert realised["replay_positions"] == 0
    assert mix.drawn is None  # counting stops: training draws are not counted


def test_loss_mask_covers_exactly_targets_and_their_eot():
    mix = FinetuneMixture({"a": FakeSplit(7)}, {"a": 1.0}, block_size=20, batch_size=2, seed=0)
    batch = mix.batch(0, 0)
    x, y, mask = batch[0], batch[1], loss_mask(batch)
    assert torch.equal(x[:, 1:], y[:, :-1])
    # 3 whole examples of 6 tokens fit in 21 positions; the rest is padding without loss
    assert y[0][mask[0]].tolist() == [107, 107, EOT] * 3
    assert not mask[0][17:].any()
    assert batch[4][0].tolist()[:7] == [0, 1, 2, 3, 4, 5, 0]  # each example starts at position 0
    shared = FinetuneMixture({"a": FakeSplit(7)}, {"a": 1.0}, block_size=20, batch_size=2, seed=0, isolate=False)
    assert shared.batch(0, 0)[4] is None  # plain causal attention over the whole row


def weight_per_document(batch):
    """[(first token, total loss weight)] of each document packed in a batch, row by row."""
    x, _, rows, weights, positions = batch
    weight = torch.zeros(x.numel()).index_add_(0, rows, weights)
    doc = (positions == 0).reshape(-1).cumsum(0) - 1  # every row starts a document
    totals = torch.zeros(int(doc[-1]) + 1).index_add_(0, doc, weight)
    return list(zip(x.reshape(-1)[positions.reshape(-1) == 0].tolist(), totals.tolist()))


def test_replay_text_carries_exactly_its_share_of_the_loss_and_of_the_positions(tmp_path):
    from data import TokenWindows
    np.arange(1000, 3000, dtype=np.uint16).tofile(tmp_path / "owt.bin")  # replay tokens are >= 1000
    replay = TokenWindows(str(tmp_path / "owt.bin"), 20, 4, seed=0)
    mix = FinetuneMixture({"a": FakeSplit(1)}, {"a": 1.0}, 20, 8, 0, replay=replay, replay_fraction=0.25)
    task_weight = []
    for step in range(20):
        batch = mix.batch(step, 0)
        docs = weight_per_document(batch)
        replay_weight = sum(w for first, w in docs if 1000 <= first < 3000)
        assert replay_weight == pytest.approx(0.25, abs=1e-6)  # every batch
        task_weight.append(sum(w for first, w in docs if first == 1))
        x = batch[0]
        assert float(((x >= 1000) & (x < 3000)).float().mean()) == pytest.approx(0.25, abs=0.01)
    assert np.mean(task_weight) == pytest.approx(0.75, abs=0.01)  # the tasks' share on average


@pytest.mark.parametrize("average, long_over_short", [("example", 1.0), ("token", 10 / 2)])
def test_every_example_or_target_token_weighs_the_same_in_every_batch(average, long_over_short):
    splits = {"short": FakeSplit(1, target_len=1), "long": FakeSplit(2, target_len=9)}  # 2 and 10 targets
    mix = FinetuneMixture(splits, {"short": 1.0, "long": 1.0}, 64, 4, 0, average=average)
    batches = [weight_per_document(mix.batch(step, 0)) for step in range(30)]
    short = {round(w, 6) for docs in batches for first, w in docs if first == 1}
    long = {round(w, 6) for docs in batches for first, w in docs if first == 2}
    assert len({sum(first == 2 for first, _ in docs) for docs in batches}) > 1  # batches hold different mixes
    assert len(short) == len(long) == 1  # yet an example of a task weighs the same in all of them
    assert long.pop() / short.pop() == pytest.approx(long_over_short, rel=1e-4)
    assert np.mean([sum(w for _, w in docs) for docs in batches]) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("block_size, batch_size, weights", [(512, 4, (1, 1, 1)), (1024, 16, (2, 2, 1))])
def test_packed_examples_and_loss_shares_follow_the_weights_with_real_example_lengths(
        shared_data, tmp_path, block_size, batch_size, weights):
    """At the CPU preset's rows (4 x 512) and the GPU preset's (16 x 1024). The loss shares drifted
    before the loss weights were the same in every batch: CNN/DM 16.7% against 14.7% at 512 x 4."""
    names = ("cnn_dailymail", "squad", "sst2")
    prepare_finetune.main(["--data-root", str(shared_data), "--out-dir", str(tmp_path), "--splits", "train",
                           "--block-size", str(block_size), "--limit", "300", "--num-proc", "1"])
    splits = {n: tasks.FinetuneSplit(str(tmp_path / n / "train")) for n in names}
    first_token = {int(s.example(0)[0][0]): k for k, s in enumerate(splits.values())}  # each instruction's
    assert len(first_token) == 3
    mix = FinetuneMixture(splits, dict(zip(names, weights)), block_size, batch_size, seed=0)
    counts, loss, step = np.zeros(3), np.zeros(3), 0
    while counts.sum() < 40_000:
        for first, w in weight_per_document(mix.batch(step, 0)):
            if first in first_token:
                counts[first_token[first]] += 1
                loss[first_token[first]] += w
        step += 1
    expected = np.array(weights) / sum(weights)
    assert np.abs(counts / counts.sum() - expected).max() < 0.01, counts
    assert np.abs(loss / loss.sum() - expected).max() < 0.01, loss / loss.sum()
    assert loss.sum() / step == pytest.approx(1.0, abs=0.02)  # the loss weights sum to 1 on average


def test_unknown_task_weight_is_a_clear_error():
    cfg = finetune.FinetuneConfig(task_weights="squad:1,glue:2")
    with pytest.raises(UserError, match="task_weights names 'glue', which is not in tasks"):
        finetune.task_weights(cfg, ["squad", "sst2"], {"squad": 10, "sst2": 10})
    cfg = finetune.FinetuneConfig(mix_cap=100)
    assert finetune.task_weights(cfg, ["squad", "sst2"], {"squad": 1000, "sst2": 40}) == {"squad": 100, "sst2": 40}


@pytest.mark.parametrize("setting, message", [
    ("--task_weights=squad:1,glue:2", "task_weights names 'glue', which is not in tasks"),
    ("--task_weights=squad:one", "task_weights entry 'squad:one' must look like name:number"),
    ("--replay_fraction=1.5", "replay_fraction=1.5 must be at least 0 and below 1"),
    ("--task_average=sentence", "task_average='sentence'; choose example or token"),
    ("--mix_cap=0", "mix_cap=0 must be at least 1"),
])
def test_settings_are_checked_before_the_data_and_checkpoint_are_looked_for(tmp_path, setting, message):
    argv = ["config/finetune_smoke.py", f"--finetune_dir={tmp_path}/not_prepared", f"--init_from={tmp_path}/no.pt",
            f"--out_dir={tmp_path}/out", "--tasks=squad,sst2", setting]
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        finetune.main(argv)
    assert not (tmp_path / "out").exists()


def test_selection_slice_is_whole_texts_held_out_of_train_and_the_same_in_any_row_order(shared_data, tmp_path):
    prepare_finetune.main(["--data-root", str(shared_data), "--out-dir", str(tmp_path), "--splits", "train",
                           "--block-size", str(BLOCK), "--limit", "300", "--num-proc", "1"])
    args = prepare_finetune.parse_args(["--data-root", str(shared_data), "--limit", "300"])
    for task in tasks.task_list("all"):
        rows = task.load_rows("train", str(shared_data), limit=300)
        train, select, record = prepare_finetune.hold_out(task, rows, *prepare_finetune.reported_keys(task, args))
        meta = json.loads((tmp_path / task.name / "meta.json").read_text())
        assert meta["selection"] == record and record["reported_splits"] == list(task.eval_splits)
        assert meta["splits"]["train"]["examples"] == len(train) and meta["splits"]["select"]["examples"] == len(select)
        assert len(train) + len(select) == 300 and len(select) >= 15  # 5% of the rows, whole texts
        ids = lambda part: {task.example_id(r) for r in part}  # noqa: E731
        keys = lambda part: {task.holdout_key(r) for r in part}  # noqa: E731
        assert not ids(train) & ids(select) and not keys(train) & keys(select)  # no text on both sides
        for split in task.eval_splits:  # nor in any split that is reported, whole
            if split not in task.unlabelled_splits:
                assert not keys(select) & keys(task.load_rows(split, str(shared_data)))
        prepared = tasks.FinetuneSplit(str(tmp_path / task.name / "select"))
        first, prompt_len = prepared.example(0)
        assert first[:prompt_len].tolist() == task.prompt(select[0], get_tokenizer(), BLOCK).ids
        shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
        again = prepare_finetune.hold_out(task, shuffled, *prepare_finetune.reported_keys(task, args))
        assert [task.example_id(r) for r in again[1]] == [task.example_id(r) for r in select] and again[2] == record
    squad = tasks.get_task("squad")
    assert len({squad.holdout_key(r) for r in squad.load_rows("train", str(shared_data), limit=300)}) < 100


def test_selection_slice_never_takes_a_text_of_a_reported_split(shared_data):
    sst2 = tasks.get_task("sst2")
    rows = sst2.load_rows("train", str(shared_data), limit=400)
    free = {sst2.holdout_key(r) for r in rows[:30]}  # the only texts not also in a reported split
    reported = {sst2.holdout_key(r) for r in rows} - free
    train, select, record = prepare_finetune.hold_out(sst2, rows, reported, ["validation"])
    assert {sst2.holdout_key(r) for r in select} <= free and len(select) == 20  # 5% of 400
    assert record["reported_texts_skipped"] == len(reported)
    with pytest.raises(UserError, match="too few to hold out a selection slice"):
        prepare_finetune.hold_out(sst2, rows[:1], set(), ["validation"])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shared_data):
    """Real prepared task data (40 train rows: no reported split is prepared, none is needed) and a
    randomly initialised tiny model."""
    root = tmp_path_factory.mktemp("ft")
    prepare_finetune.main(["--data-root", str(shared_data), "--out-dir", str(root / "tasks"), "--splits", "train",
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


def test_short_finetune_on_real_data_lowers_every_task_loss_reading_only_train_and_select(workspace, monkeypatch):
    opened = []

    class Spy(tasks.FinetuneSplit):
        def __init__(self, prefix):
            opened.append(os.path.relpath(prefix, workspace / "tasks"))
            super().__init__(prefix)
    monkeypatch.setattr(tasks, "FinetuneSplit", Spy)
    finetune.main(args(workspace, "run", "--max_iters=30", "--eval_interval=30", "--learning_rate=3e-3"))
    names = ("cnn_dailymail", "squad", "sst2")
    assert sorted(opened) == sorted(f"{n}/{s}" for n in names for s in ("train", "select"))
    first, last = evals(workspace / "run")[0], evals(workspace / "run")[-1]
    for task in names:
        assert last[f"val/{task}"] < first[f"val/{task}"] - 0.5, (task, first, last)
    model = torch.load(workspace / "run" / "model.pt", weights_only=False)
    assert model["tasks_version"] == 1 and model["val_losses"].keys() == set(names)
    assert model["data_block_size"] == BLOCK  # evaluate.py builds its prompts at this size
    assert model["realised_mix"]["examples"].keys() == set(names)
    meta = {n: json.loads((workspace / "tasks" / n / "meta.json").read_text()) for n in names}
    assert model["selection"] == {n: meta[n]["selection"] for n in names}  # what model.pt was chosen on
    with open(workspace / "run" / "metrics.jsonl") as f:
        plan = next(r for r in map(json.loads, f) if r["type"] == "plan")
    assert plan["selection"] == model["selection"]


def test_data_prepared_without_a_selection_split_is_a_clear_error(workspace, tmp_path):
    shutil.copytree(workspace / "tasks", tmp_path / "tasks")
    meta_path = tmp_path / "tasks" / "squad" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["splits"]["select"]  # as prepare_finetune.py wrote it before the selection split
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="squad/meta.json has no 'select' split; rerun prepare_finetune.py"):
        finetune.main(args(workspace, "old", f"--finetune_dir={tmp_path}/tasks"))


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


def test_torchrun_two_processes_finetune_as_one_process_accumulating_two(workspace):
    """Under torchrun each process takes its own micro-steps of the same mixture, drawn with the same
    calibrated probabilities and loss weights: the result is one process's with 2 micro-steps."""
    extra = ("--max_iters=4", "--eval_interval=4", "--eval_iters=1", "--gradient_accumulation_steps=2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "finetune.py",
           *args(workspace, "ddp", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    finetune.main(args(workspace, "single", *extra))
    ddp, single = (torch.load(workspace / out / "ckpt.pt", weights_only=False)["model"] for out in ("ddp", "single"))
    assert all(torch.allclose(ddp[k], single[k], atol=1e-5) for k in single)
    with open(workspace / "ddp" / "metrics.jsonl") as f:
        ranks = next(r for r in map(json.loads, f) if r["type"] == "ranks")["ranks"]
    assert len(ranks) == 2 and ranks[0]["first_batch"] != ranks[1]["first_batch"]


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
