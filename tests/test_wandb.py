"""wandb_log: every record of metrics.jsonl also goes to Weights & Biases, from rank 0; wandb is
imported only when asked for, and its absence then is a one-line error. The fake module runs
everywhere; the real wandb (offline) where it is installed."""
import json
import sys
import types

import pytest

import train
from common import UserError

from conftest import TINY


def records(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def tiny_run(corpus, *extra):
    out = corpus / "run"
    train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2", *extra])
    return out


class FakeRun:
    def __init__(self, **settings):
        self.settings, self.logged, self.finished, self.metrics = settings, [], 0, {}

    def define_metric(self, name, step_metric):
        self.metrics[name] = step_metric

    def log(self, record):
        self.logged.append(json.loads(json.dumps(record)))  # as sent: a later change to the dict would not count

    def finish(self):
        self.finished += 1


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    module = types.ModuleType("wandb")
    module.init = lambda **settings: runs.append(FakeRun(**settings)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", module)
    return runs


def test_every_metrics_record_goes_to_wandb_as_it_is(corpus, fake_wandb):
    out = tiny_run(corpus, "--wandb_log=true", "--wandb_project=course")
    (run,) = fake_wandb
    assert run.logged == records(out)  # the same records, keys and values, in the same order
    assert {r["type"] for r in run.logged} >= {"plan", "train", "eval"}
    assert run.finished == 1 and run.metrics == {"*": "iter"}  # charted against the step, not the call count
    assert run.settings["project"] == "course" and run.settings["name"] == "run"  # out_dir's name by default
    assert run.settings["dir"] == str(out) and run.settings["config"]["max_iters"] == 4


def test_wandb_is_imported_only_when_asked_for_and_missing_it_is_a_clear_error(corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, as where it is not installed
    tiny_run(corpus)  # off by default: trains without it
    with pytest.raises(UserError, match=r"wandb_log=true needs the wandb package: pip install wandb"):
        tiny_run(corpus, "--wandb_log=true", "--overwrite")


def test_real_wandb_offline_receives_the_keys_of_metrics_jsonl(corpus, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summaries, real_init = [], wandb.init

    def init(**settings):  # the run's summary (the last value of every key logged) just before it finishes
        run = real_init(**settings)
        real_finish = run.finish
        run.finish = lambda: summaries.append(dict(run.summary)) or real_finish()
        return run
    monkeypatch.setattr(wandb, "init", init)
    out = tiny_run(corpus, "--wandb_log=true", "--wandb_run_name=tiny")
    (summary,) = summaries
    logged = records(out)
    assert {k for k in summary if not k.startswith("_")} == {k for r in logged for k in r}
    last_eval = [r for r in logged if r["type"] == "eval"][-1]
    assert summary["val_loss"] == pytest.approx(last_eval["val_loss"]) and summary["iter"] == logged[-1]["iter"]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # what `wandb sync` uploads
