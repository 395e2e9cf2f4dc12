"""report.py on a small fake run folder: numbers, anchors, commands and curves reach REPORT.md;
a partial run still gets a report; a wrong folder is a one-line error."""
import dataclasses
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import scoring
import metrics
import report
import tasks
from common import UserError
from config import FinetuneConfig, TrainConfig
from conftest import ROOT
from model import GPT, GPTConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHA256 = "0123456789abcdef" * 4
ARCH = dict(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32, pos_emb="rope", norm="rmsnorm",
            mlp="swiglu", tie_embeddings=True)


def write_metrics(path, iters, tasks=None, plans=()):
    with open(path, "w") as f:
        for plan in plans:  # trainer.py's plan records: the start's figures, a time budget's decision
            f.write(json.dumps({"type": "plan", "iter": 0, "time": 0.5, **plan}) + "\n")
        for it in iters:
            if it % 10 == 0:
                losses = {t: 3.0 - it / 100 + k for k, t in enumerate(tasks or ["val"])}
                mean = sum(losses.values()) / len(losses)
                f.write(json.dumps({"type": "eval", "iter": it, "time": 1.0 + it, "val_loss": mean,
                                    **{f"val/{t}": v for t, v in losses.items()}}) + "\n")
            if it:
                f.write(json.dumps({"type": "train", "iter": it, "time": 1.5 + it, "loss": 4.0 - it / 50, "lr": 1e-3,
                                    "ms_per_iter": 250.0, "tokens_per_s": 1234.0 + it, "mfu": 0.01,
                                    "eta_s": 250.0 * (40 - it), "peak_mem_mib": 1000.0 + it}) + "\n")
        f.write('{"type": "train", "iter": 9')  # a half-written line of a run still going


def save_checkpoint(path, cfg, **extra):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ARCH))
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                "config": dataclasses.asdict(cfg), **extra}, path)
    return model


def eval_result(task, scores, base, split="validation"):
    """A metrics JSON shaped exactly as evaluate.main writes it."""
    return {"task": task, "split": split, "count": 2, "scores": scores, "baseline": base,
            "shots": {"requested": None, "format": "finetuning prompt"},
            "decoding": scoring.decoding_settings(tasks.get_task(task), scoring.EvalSettings()), "wall_time_s": 1.5,
            "examples_per_s": 1.3, "generated_tokens": None, "generated_tokens_per_s": None,
            "checkpoint": {"path": "/x/model.pt", "sha256": SHA256}, "tasks_version": 1,
            "checkpoint_tasks_version": 1, "device": "cpu", "dtype": "float32", "data_source": f"../shared/{task}"}


def write_data_meta(data):
    """meta.json files as prepare_owt.py and prepare_finetune.py write them."""
    (data / "owt").mkdir(parents=True)
    (data / "owt" / "meta.json").write_text(json.dumps({
        "source": "../shared/data/webtext", "source_bytes": 2_500_000, "stopped_by": "max_tokens",
        "splits": {"train": {"tokens": 123_456, "documents": 789}, "val": {"tokens": 2_345, "documents": 6}},
        "decontamination": {"enabled": True, "n": 13, "eval_ngrams": 7_000_899, "documents_dropped": 17,
                              "min_words": 5, "short_texts_matched_whole": 6_994, "texts_too_short": 235}}))
    for i, task in enumerate(("cnn_dailymail", "squad", "sst2")):
        (data / "ft" / task).mkdir(parents=True)
        split = {"examples": 1000 + i, "tokens": 50_000 + i, "inputs_cut": 3, "targets_cut": 0}
        (data / "ft" / task / "meta.json").write_text(json.dumps({"splits": {"train": split, "validation": split}}))


@pytest.fixture()
def run(tmp_path):
    run = tmp_path / "out" / "fake"
    for sub in ("pretrain", "finetune", "eval", "pipeline"):
        (run / sub).mkdir(parents=True)
    write_data_meta(tmp_path / "data")
    pre_cfg = TrainConfig(**{k: ARCH[k] for k in ARCH if k != "vocab_size"}, batch_size=4, max_iters=40,
                          data_dir=str(tmp_path / "data" / "owt"))
    model = save_checkpoint(run / "pretrain" / "ckpt.pt", pre_cfg, iter_num=40, best_val_loss=2.6)
    start = {"params": 160_000, "non_embedding_params": 40_000, "tokens_per_step": 256, "steps": 40, "tokens": 10_240,
             "train_flops": 2.5e9, "micro_batch": 4, "accumulation": 1, "pieces": 1, "processes": 1,
             "batch_chosen_by": "memory probe", "ckpt_bytes": 1_920_000, "best_bytes": 640_000, "batch_tries": []}
    budget = {"budget_hours": 0.5, "max_iters": 40, "measured": [2, 11], "step_s": 0.25, "eval_s": 1.0,
              "save_s": 0.5, "seconds_left": 1700.0}
    write_metrics(run / "pretrain" / "metrics.jsonl", range(0, 41), plans=(start, budget))
    tasks = ["cnn_dailymail", "squad", "sst2"]
    ft_cfg = FinetuneConfig(**{k: ARCH[k] for k in ARCH if k != "vocab_size"}, batch_size=2, max_iters=20,
                            task_weights="cnn_dailymail:2,squad:2,sst2:1", finetune_dir=str(tmp_path / "data" / "ft"))
    mix = {"batches": 40, "replay_positions": 0.1, "examples": {"cnn_dailymail": 60, "squad": 90, "sst2": 150}}
    selection = {t: {"split": "select", "examples": 20 + i, "rule": "whole texts in blake2b order",
                     "reported_splits": ["test", "validation"] if t == "cnn_dailymail" else ["validation"]}
                 for i, t in enumerate(tasks)}  # as prepare_finetune.py records it (abridged)
    save_checkpoint(run / "finetune" / "model.pt", ft_cfg, iter_num=20, tasks_version=1, tasks=tasks,
                    val_loss=2.8, val_losses={"cnn_dailymail": 2.8, "squad": 3.8, "sst2": 4.8}, realised_mix=mix,
                    selection=selection)
    write_metrics(run / "finetune" / "metrics.jsonl", range(0, 21), tasks)

    squad = metrics.squad_scores(["Denver Broncos", "in 1990"], [["Denver Broncos"], ["1989", "in 1989"]])
    cnn_refs = ["A man was hurt.\nPolice came.", "Rain fell all day."]
    cnn = metrics.summarization_scores(["A man was hurt today.", "It rained."], cnn_refs)
    squad_base = metrics.squad_scores(["x", "y"], [["Denver Broncos"], ["1989"]])
    sst2 = metrics.accuracy(["positive", "positive"], ["positive", "negative"])
    files = {
        "squad": (eval_result("squad", squad, {"name": "question-overlap sentence", "scores": squad_base}),
                  [{"id": "q1", "title": "Super_Bowl_50", "prediction": "Denver Broncos", "references": ["Denver Broncos"]},
                   {"id": "q2", "title": "Warsaw", "prediction": "in 1990", "references": ["1989", "in 1989"]}]),
        "cnn_dailymail": (eval_result("cnn_dailymail", cnn, {"name": "lead-3", "scores": cnn}, "test"),
                          [{"id": "c1", "prompt": "Article: " + "word " * 200, "prediction": "A man was hurt today.",
                            "references": [cnn_refs[0]]}]),
        "sst2": (eval_result("sst2", sst2, {"name": "majority class (positive, from train split)",
                                            "scores": {"accuracy": 50.0, "count": 2}}),
                 [{"id": "7", "prediction": "positive", "references": ["positive"],
                   "label_logprobs": {"negative": -2.0, "positive": -0.5}}]),
    }
    files["squad"][0]["sample"] = {"rows": 2, "of": 8981, "method": "seeded random sample, proportionally stratified",
                                   "seed": 0, "stratified_by": "article (title)", "strata": 40, "strata_sampled": 2,
                                   "ids_blake2b": "ab" * 16}
    files["squad"][0]["prompts"] = {"block_size": 64, "target_room": 32, "inputs_cut": 1}
    for task, (result, preds) in files.items():
        (run / "eval" / f"{task}_{result['split']}_metrics.json").write_text(json.dumps(result))
        lines = "".join(json.dumps(p) + "\n" for p in preds)
        (run / "eval" / f"{task}_{result['split']}_predictions.jsonl").write_text(lines)
    fewshot = {"requested": 3, "format": "finetuning prompt", "used_mean": 2.25, "used_min": 1, "used_max": 3}
    for shots, f1 in ((0, 12.5), (3, 25.0)):  # the pretrained model, zero- and few-shot, SQuAD only
        pretrained = dict(files["squad"][0], checkpoint_tasks_version=None, scores=dict(squad, f1=f1),
                          shots=fewshot if shots else {"requested": 0, "format": "finetuning prompt"})
        (run / f"eval_pretrained_{shots}shot").mkdir()
        (run / f"eval_pretrained_{shots}shot" / "squad_validation_metrics.json").write_text(json.dumps(pretrained))
    owt = {"task": "owt", "split": "val", "count": 3, "baseline": None, "wall_time_s": 0.1, "tokens_per_s": 1920.0,
           "scores": {"loss": 3.25, "perplexity": 25.79, "windows": 3, "tokens": 192},
           "data_source": "data/owt/val.bin"}
    (run / "eval" / "owt_val_metrics.json").write_text(json.dumps(owt))
    names = ["prepare_owt", "pretrain", "prepare_finetune", "finetune", "evaluate"]
    steps = {name: {"seconds": 61.0 * (i + 1), "skipped": i == 0, "command": [sys.executable, f"{name}.py", "--x=1"]}
             for i, name in enumerate(names)}
    timings = {"preset": "smoke", "argv": ["--preset", "smoke", "--data-root", str(tmp_path / "shared")],
               "config": {}, "data_root": None, "steps": steps}
    (run / "pipeline" / "timings.json").write_text(json.dumps(timings))
    return SimpleNamespace(dir=run, squad_f1=squad["f1"], params=sum(p.numel() for p in model.parameters()))


def test_report_has_the_runs_numbers_anchors_commands_and_curves(run):
    report.main([str(run.dir)])
    text = (run.dir / "REPORT.md").read_text()
    assert f"{run.squad_f1:.2f}" in text and "50.00" in text  # this model's F1, SST-2 accuracy
    assert f"{run.params:,}" in text and "rmsnorm" in text and "swiglu" in text and "tied" in text
    assert "1,234 tokens/s" not in text and "1,254 tokens/s" in text  # the median of 1234 + it, it = 1..40
    # the plan the run logged at its start, its time budget and the peak memory its log lines saw
    assert "| plan at the start | 10.24k tokens, 2.50e+09 training FLOPs; micro-batch 4 x 1 accumulated over 1 " \
           "process(es) (by memory probe); checkpoints 0.00 GB |" in text
    assert "| time budget | 0.5 h: 0.25 s per step measured -> 40 steps |" in text
    assert "| peak memory | 1.0 GiB |" in text  # 1040 MiB
    assert "40.34" in text and "See et al. 2017" in text and "29.34" in text and "88.5" in text and "93.5" in text
    assert "CNN-only" in text and "question-overlap sentence" in text and "perplexity 25.8" in text
    assert "finetune.py --x=1" in text and "skipped" in text and "--preset smoke" in text
    assert "cnn_dailymail:2,squad:2,sst2:1" in text and "| squad | 3.0000 | 3.8000 |" not in text
    assert "| squad | 4.0000 | 3.8000 | 3.8000 |" in text  # per-task start, end and model.pt losses
    greedy = "greedy, up to 32 tokens; inputs cut to fit 64 tokens less 32 for the answer (1 of 2 cut)"
    assert ("| system | protocol | exact_match | f1 |\n|---|---|---|---|\n| **finetuned model** | " + greedy
            + " | 50.00 [0.00, 100.00] |") in text
    assert f"| pretrained model, zero-shot (finetuning prompt) | {greedy} | 50.00 | 12.50 |" in text
    assert "| pretrained model, 3-shot requested (2.25 fit on average, 1-3) |" in text
    assert "2 test articles from ../shared/cnn_dailymail (no sample record" in text  # the split is named
    assert "### cnn_dailymail (test)" in text
    assert ("2 of the 8,981 validation questions of ../shared/squad: a seeded random sample (seed 0), stratified by "
            f"article (title) (2 of 40 strata drawn from), ids blake2b `{'ab' * 16}`") in text
    assert "top-k=2 sampling, first 3 sentences, CNN+DM test" in text and "| as published |" in text
    assert "Intervals resample 2 clusters of questions sharing a title (**finetuned model**)." in text
    assert "| model.pt chosen on | `select`, held out of each task's train split and never trained on " \
           "(cnn_dailymail 20, squad 21, sst2 22 examples): whole texts in blake2b order; no text of a reported " \
           "split (test, validation) |" in text and "Per-task selection loss" in text
    assert "python finetune.py" in text and "--task_weights=cnn_dailymail:2,squad:2,sst2:1" in text
    assert "Article: word word" in text and "..." in text and "id `q1`" in text
    for name in ("pretrain_loss.png", "finetune_loss.png"):
        assert (run.dir / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text


def test_report_has_a_data_section_with_the_realised_mix(run):
    report.main([str(run.dir)])
    text = (run.dir / "REPORT.md").read_text()
    data = text.split("## Data")[1].split("## Training")[0]
    assert "| train | 123,456 | 789 |" in data and "| val | 2,345 | 6 |" in data
    assert "17 documents dropped" in data and "../shared/data/webtext" in data
    assert "6,994 shorter ones (5-12 words) whole; 235 texts under 5 words are not matched" in data
    assert "| squad | validation | 1,001 | 50,001 | 3 | 0 |" in data
    assert "first 40 training batches" in data and "fills 10.0% of the positions" in data
    assert "| sst2 | 150 | 50.0% |" in data  # 150 of the 300 examples drawn


def test_scores_carry_intervals_and_a_warning_under_200_examples(run):
    report.main([str(run.dir)])
    text = (run.dir / "REPORT.md").read_text()
    assert text.count("Warning: only 2 examples (under 200)") == 3
    assert f"checkpoint sha256 `{SHA256}`" in text  # the full hash
    # squad has both predictions: intervals; the others' files hold fewer lines than the count
    squad, cnn = text.split("### squad")[1], text.split("### cnn_dailymail")[1].split("### sst2")[0]
    assert "[0.00, 100.00]" in squad and "[" not in cnn.split("| **finetuned model** |")[1].split("\n")[0]


def test_provenance_commands_as_typed_and_one_time_per_step(run, monkeypatch):
    monkeypatch.chdir(run.dir.parent.parent)  # the folder the run was made in
    report.main([str(run.dir)])
    text = (run.dir / "REPORT.md").read_text()
    header = text.split("## Model")[0]
    assert "Written 20" in header and ("commit `" in header or "not a git checkout" in header)
    assert "`python pipeline.py --preset smoke --data-root shared` ran these steps" in text
    assert sys.executable not in text  # `python`, not this machine's interpreter path
    times = text.split("## Time per step")[1].split("##")[0]
    assert [line.split(" | ")[0] for line in times.splitlines() if line.startswith("| ") and "---" not in line][1:] == [
        "| prepare_owt", "| pretrain", "| prepare_finetune", "| finetune", "| evaluate"]
    assert "| pretrain | 42 s | training loop, metrics log |" in times  # the log's 41.5 s, not the pipeline's 122 s
    assert "min)" not in text.split("## Commands")[1]  # the commands carry no second time figure


def test_partial_run_without_evaluation_or_timings_still_gets_a_report(run):
    run = run.dir
    for folder in run.glob("eval*"):
        shutil.rmtree(folder)
    (run / "pipeline" / "timings.json").unlink()
    (run / "finetune" / "model.pt").unlink()
    report.main([str(run), "--samples", "1"])
    text = (run / "REPORT.md").read_text()
    assert "## Evaluation\n\nNot run" in text and "Run by hand" in text
    assert "GPT-2 BPE" in text  # the model card falls back to the pretrained checkpoint


def test_wall_time_adds_up_the_segments_of_a_resumed_run():
    lines = [{"iter": 0, "time": 1.0}, {"iter": 10, "time": 11.0}, {"iter": 20, "time": 2.0}, {"iter": 30, "time": 12.0}]
    assert report.wall_seconds(lines) == 23.0


def test_missing_run_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        report.main([str(tmp_path / "nope")])
    result = subprocess.run([sys.executable, str(ROOT / "report.py"), str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_a_few_shot_row_where_no_demonstration_fits_is_called_zero_shot(shared_data):
    """CNN/DM articles fill a 512-token block by themselves: "3-shot" there is zero-shot."""
    import fewshot
    from common import get_tokenizer
    task = tasks.get_task("cnn_dailymail")
    rows = task.load_rows("test", str(shared_data), limit=4)
    record = fewshot.build_prompts(task, rows, get_tokenizer(), 512, 3, str(shared_data))[2]
    assert record["used_max"] == 0
    name = report.system_name({"checkpoint_tasks_version": None, "shots": record})
    assert name.startswith("pretrained model, zero-shot: 0 of 3 demonstrations fit") and "3-shot" not in name
    some = dict(record, used_mean=0.38, used_min=0, used_max=1)
    assert report.system_name({"shots": some}).startswith("pretrained model, 3-shot requested (0.38 fit on average, 0-1)")
