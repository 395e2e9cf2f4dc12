"""A new task is one object: registered here, in the test alone, it goes through data preparation,
the finetuning mixture, finetune.py and evaluate_task with no other file touched."""
import gzip
import json
from dataclasses import dataclass

import pytest
import torch

import scoring
import finetune
import prepare_finetune
import tasks
from common import get_tokenizer
from data import FinetuneMixture, loss_mask
from model import GPT, GPTConfig


@dataclass(frozen=True)
class ReverseWords(tasks.Task):
    """Write the input's words in reverse order; scored by exact match, against echoing the input."""

    def inputs(self, row):
        return [row["words"].strip()]

    def references(self, row):
        return [" ".join(reversed(row["words"].split()))]

    def score(self, predictions, references):
        hits = [p == r[0] for p, r in zip(predictions, references)]
        return {"exact": 100.0 * sum(hits) / len(hits), "count": len(hits)}

    def baseline(self, rows, data_root=None, split=None):
        echo = [self.inputs(r)[0] for r in rows]
        return {"name": "echo", "scores": self.score(echo, [self.references(r) for r in rows])}


TOY = ReverseWords(name="reverse", hub_path="none/reverse", hub_config=None, local_dir="reverse",
                   splits=("train", "validation"), eval_splits=("validation",), required_fields=("id", "words"),
                   max_target_tokens=12, max_new_tokens=12, instruction="Reverse the words.",
                   input_label="Words", separator="\n\nReversed:", report_metrics=("exact",))
WORDS = "red green blue cat dog sun moon tree".split()


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    tasks.register(TOY)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 60), ("validation", 12)):
        (tmp_path / "data" / "reverse").mkdir(parents=True, exist_ok=True)
        with gzip.open(tmp_path / "data" / "reverse" / f"{split}.jsonl.gz", "wt") as f:
            for i in range(n):
                words = [WORDS[j] for j in torch.randint(0, len(WORDS), (4,), generator=g)]
                f.write(json.dumps({"id": f"{split}-{i}", "words": " ".join(words)}) + "\n")
    return tmp_path


def test_a_task_registered_in_a_test_runs_through_every_stage(toy):
    assert [t.name for t in tasks.task_list("all")][-1] == "reverse"
    prepare_finetune.main(["--tasks", "reverse", "--data-root", str(toy / "data"), "--out-dir", str(toy / "ft"),
                           "--block-size", "64", "--num-proc", "1"])
    meta = json.loads((toy / "ft" / "reverse" / "meta.json").read_text())
    assert meta["splits"]["validation"]["examples"] == 12
    assert meta["splits"]["train"]["examples"] == 57 and meta["splits"]["select"]["examples"] == 3  # 5% held out

    split = tasks.FinetuneSplit(str(toy / "ft" / "reverse" / "train"))
    batch = FinetuneMixture({"reverse": split}, {"reverse": 1.0}, 64, 2, seed=0).batch(0, 0)
    enc = get_tokenizer()
    targets = enc.decode(batch[1][loss_mask(batch)].tolist())
    assert "<|endoftext|>" in targets and "Reversed" not in targets  # loss on targets only

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    torch.save({"model": model.state_dict(), "model_config": vars(model.config)}, toy / "init.pt")
    finetune.main(["config/finetune_smoke.py", f"--init_from={toy}/init.pt", f"--finetune_dir={toy}/ft",
                   f"--out_dir={toy}/run", "--tasks=reverse", "--replay_fraction=0", "--block_size=64",
                   "--batch_size=2", "--max_iters=2", "--eval_interval=2", "--eval_iters=1"])
    finetuned = torch.load(toy / "run" / "model.pt", weights_only=False)
    assert set(finetuned["val_losses"]) == {"reverse"}

    rows = tasks.get_task("reverse").load_rows("validation", str(toy / "data"))
    settings = scoring.EvalSettings(batch_size=4, progress=False)
    result, preds = scoring.evaluate_task(model, enc, "reverse", rows, settings)
    assert result["task"] == "reverse" and result["count"] == 12 and set(result["scores"]) == {"exact", "count"}
    echo_hits = sum(r["words"] == TOY.references(r)[0] for r in rows)
    assert result["baseline"] == {"name": "echo", "scores": {"exact": 100.0 * echo_hits / 12, "count": 12}}
    assert result["decoding"]["strategy"] == "greedy" and len(preds) == 12
    assert all(p["references"] == TOY.references(r) for p, r in zip(preds, rows))
