"""Evaluation under torchrun writes what one process writes, and the decoding batch is fitted to
memory (the most prompts that fit, an out-of-memory batch halved, no example lost)."""
import collections
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import fewshot
import memory
import pipeline
import scoring
import tasks
from common import get_tokenizer
from model import GPT

from conftest import ROOT
from test_evaluate import save_checkpoint, tiny

# --max-new-tokens beyond the room the prompts reserve: a batch generates only up to the end of the
# block, so the longest prompt of a batch bounds the length of every output in it (the untrained
# model never stops early). A batch formed differently from one process's shows in its predictions.
BATCH_VISIBLE = ["--max-new-tokens", 400]


def torchrun_evaluate(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "evaluate.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_same_files(one, two):
    """Byte-identical predictions; identical metrics once the timing fields are left out."""
    names = sorted(os.listdir(one))
    assert names == sorted(os.listdir(two)) and names
    for name in names:
        if name.endswith("_predictions.jsonl"):
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
            continue
        single, shared = json.loads((one / name).read_text()), json.loads((two / name).read_text())
        assert (single["processes"], shared["processes"]) == (1, 2)
        for field in scoring.TIMING_FIELDS:
            single.pop(field, None), shared.pop(field, None)
        assert single == shared, name


@pytest.mark.parametrize("case", [
    # batches 0 and 2 on process 0, batch 1 on process 1, each of more than one prompt but the last
    # constrained SQuAD, greedy CNN/DM, SST-2's label likelihoods; owt: 9 windows in batches of 8 and 1
    ["--task", "all", "--constrained", "--limit", 9, "--batch-size", 3],
    ["--task", "cnn_dailymail", "--num-beams", 2, "--limit", 5, "--batch-size", 2],  # beam search
    # GPT-2's protocol samples: each batch's draws are seeded by its prompts, on whichever process
    ["--task", "cnn_dailymail", "--protocol", "gpt2", "--limit", 5, "--batch-size", 2],
], ids=["constrained-greedy-labels-owt", "beam", "gpt2-protocol"])
def test_two_processes_write_the_predictions_and_metrics_of_one(tmp_path, shared_data, case):
    ckpt = save_checkpoint(tmp_path / "model.pt", tasks_version=tasks.TASKS_VERSION)
    decoding = [] if "--protocol" in case else BATCH_VISIBLE  # the protocol fixes its own length
    args = [*case, *decoding, "--ckpt", ckpt, "--data-root", shared_data,
            "--owt-text", shared_data / "webtext" / "train-00000.jsonl.gz"]
    proc = torchrun_evaluate(2, *args, "--out", tmp_path / "two")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    evaluate.main([str(a) for a in args] + ["--out", str(tmp_path / "one")])
    assert_same_files(tmp_path / "one", tmp_path / "two")
    task = case[1] if case[1] != "all" else "squad"
    assert f"{task} [rank 0/2]" in proc.stderr and f"{task} [rank 1/2]" in proc.stderr  # a bar per process
    assert "on 2 processes" in proc.stdout and proc.stdout.count("wrote ") == 1  # process 0 reports


def test_the_pipeline_evaluates_under_torchrun_when_it_trains_under_it():
    several = pipeline.PipelineConfig(nproc=2)
    assert pipeline.python_cmd("evaluate.py", several)[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert pipeline.python_cmd("evaluate.py", pipeline.PipelineConfig())[1:] == [pipeline.in_repo("evaluate.py")]


# --- the batch fitted to memory ------------------------------------------------------------------

class FakeMemory:
    """A device that holds at most `rows` rows in a forward (prompts x beams while decoding); each
    batch decoded is counted (its prompts' ids)."""

    def __init__(self, monkeypatch, rows):
        self.rows, self.decoded = rows, collections.Counter()
        forward, generate = GPT.forward, scoring._generate

        def limited_forward(model, idx, *args, **kwargs):
            if idx.size(0) > self.rows:
                raise torch.OutOfMemoryError(f"CUDA out of memory ({idx.size(0)} rows)")
            return forward(model, idx, *args, **kwargs)

        def counted_generate(model, prompts, decoding, on_token=None):
            self.decoded[tuple(tuple(p.ids) for p in prompts)] += 1
            return generate(model, prompts, decoding, on_token)

        monkeypatch.setattr(GPT, "forward", limited_forward)
        monkeypatch.setattr(scoring, "_generate", counted_generate)
        monkeypatch.setattr(memory, "budget", lambda device, margin=memory.MARGIN: 2 ** 40)  # it reports memory


def test_auto_batch_is_the_most_prompts_that_fit_and_a_batch_out_of_memory_is_halved(monkeypatch, shared_data):
    model, enc = tiny(vocab_size=50304, block_size=512), get_tokenizer()
    rows = tasks.get_task("squad").load_rows("validation", str(shared_data), limit=20)
    settings = scoring.EvalSettings(num_beams=2, progress=False)

    def run(batch_size):
        return scoring.evaluate_task(model, enc, "squad", rows, dataclasses.replace(settings, batch_size=batch_size))

    unconstrained = run(4)[1]
    assert run("auto")[0]["batch_size"] == scoring.AUTO_BATCH_NO_MEMORY_SIGNAL  # the CPU reports no memory

    fake = FakeMemory(monkeypatch, rows=12)  # 6 prompts of 2 beams fit: the largest power of two is 4
    fitted = memory.largest_that_fits

    def then_another_process_takes_memory(*args, **kwargs):
        found = fitted(*args, **kwargs)
        fake.rows = 6  # 3 prompts: every batch of 4 after the first runs out of memory
        return found

    monkeypatch.setattr(memory, "largest_that_fits", then_another_process_takes_memory)
    result, predictions = run("auto")
    assert result["batch_size"] == 4 and result["batch_size_rule"].startswith("auto: ")
    assert result["batches_halved"] == 4  # batches 2 to 5, each as 2 + 2 prompts
    assert predictions == unconstrained
    prompts = [p.ids for p in fewshot.build_prompts(tasks.get_task("squad"), rows, enc, 512)[0]]
    first = tuple(tuple(prompts[i]) for i in scoring.length_order(prompts)[:4])
    assert fake.decoded[first] == 1  # fitting decoded the first batch; it is not decoded again
