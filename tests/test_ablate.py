"""bench/ablate.py: each run trains the recipe it names, on the same budget; finished runs are reused;
the report compares the recipes on the same validation windows."""
import importlib.util
import json
import math
import os

import pytest
import torch

from common import UserError
from provenance import git_state

from conftest import ROOT

spec = importlib.util.spec_from_file_location("ablate", os.path.join(ROOT, "bench", "ablate.py"))
ablate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablate)

TINY_MODEL = ["--set", "n_layer=1", "--set", "n_head=2", "--set", "n_embd=32"]


def tiny(corpus, tmp_path, *extra):
    # 2 sequences of 32 tokens per step, 10 steps; run names carry _b2 (the preset's is 4 sequences)
    return ["--data-dir", str(corpus), "--out-root", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "report"),
            "--block-size", "32", "--tokens", "640", "--batch-sizes", "2", "--evals", "2", "--eval-iters", "2",
            "--jobs", "2", *TINY_MODEL, *extra]


def saved_config(tmp_path, name):
    return torch.load(tmp_path / "runs" / name / "ckpt.pt", map_location="cpu", weights_only=False)["config"]


def test_recipes_train_what_they_name_on_equal_tokens_and_are_scored_on_the_same_windows(corpus, tmp_path):
    rows = ablate.main(tiny(corpus, tmp_path, "--seeds", "1", "--lr-scales", "1,2"))
    classic, default = saved_config(tmp_path, "classic_b2_t640_s1"), saved_config(tmp_path, "default_lr2x_b2_t640_s1")
    assert (classic["pos_emb"], classic["tie_embeddings"], classic["optimizer"]) == ("learned", True, "adamw")
    assert (default["pos_emb"], default["norm"], default["optimizer"]) == ("rope", "rmsnorm", "muon")
    # a rate scale multiplies the rate its recipe tunes: AdamW's for classic, Muon's for default
    assert classic["learning_rate"] == 2e-3 and saved_config(tmp_path, "classic_lr2x_b2_t640_s1")["learning_rate"] == 4e-3
    assert default["muon_lr"] == 0.04 and default["learning_rate"] == 2e-3
    assert {(r["recipe"], r["lr"]) for r in rows} == {("classic", 2e-3), ("classic", 4e-3),
                                                       ("default", 0.02), ("default", 0.04)}
    finals = [json.loads((tmp_path / "runs" / name / "eval" / "owt_val_metrics.json").read_text())
              for name in ("classic_b2_t640_s1", "classic_lr2x_b2_t640_s1", "default_b2_t640_s1",
                           "default_lr2x_b2_t640_s1")]
    assert len({(f["scores"]["windows"], f["scores"]["tokens"]) for f in finals}) == 1  # the same windows
    assert all(0 < f["scores"]["loss"] < math.log(50304) for f in finals)  # better than uniform guessing
    report = (tmp_path / "report" / "ablate_t640.md").read_text()  # a budget other than the preset's: its own report
    assert "| classic | adamw (0.002) | 64 | 1 |" in report and "Equal wall-clock, seed 1" in report
    assert "Equal loss, seed 1: default reaches classic's final in-training loss" in report
    assert (tmp_path / "report" / "ablate_t640.png").stat().st_size > 1000


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(0, 0.0, 10.0), (100, 1.0, 8.0), (200, 2.0, 6.0)]  # (tokens, minutes, loss)
    assert ablate.tokens_to_reach(curve, 7.0) == 150
    assert ablate.tokens_to_reach(curve, 5.0) is None
    assert ablate.loss_at_minutes(curve, 0.5) == 9.0 and ablate.loss_at_minutes(curve, 3.0) is None


def test_a_finished_run_is_reused_and_a_changed_command_retrains(corpus, tmp_path):
    args = tiny(corpus, tmp_path, "--seeds", "1", "--recipes", "classic")
    ablate.main(args)
    ckpt = tmp_path / "runs" / "classic_b2_t640_s1" / "ckpt.pt"
    before = ckpt.stat().st_mtime_ns
    ablate.main(args)
    assert ckpt.stat().st_mtime_ns == before  # nothing retrained
    ablate.main(args + ["--eval-iters", "1"])  # another command under the same name: trained again
    assert ckpt.stat().st_mtime_ns != before
    assert saved_config(tmp_path, "classic_b2_t640_s1")["eval_iters"] == 1


def test_components_train_on_top_of_default_alone_and_combined_and_extend_the_same_report(corpus, tmp_path):
    rows = ablate.main(tiny(corpus, tmp_path, "--seeds", "1", "--components", "relu2", "--combine", "relu2,softcap"))
    relu2, combined = saved_config(tmp_path, "default+relu2_b2_t640_s1"), saved_config(tmp_path,
                                                                                        "default+relu2+softcap_b2_t640_s1")
    default = saved_config(tmp_path, "default_b2_t640_s1")
    assert (relu2["mlp"], relu2["logit_softcap"], relu2["optimizer"], relu2["muon_lr"]) == ("relu2", 0.0, "muon", 0.02)
    assert (combined["mlp"], combined["logit_softcap"]) == ("relu2", 15.0)
    # nothing but the component differs from the default run
    assert {k for k in default if default[k] != relu2[k]} == {"mlp", "out_dir"}
    assert [r["recipe"] for r in rows] == ["default", "default+relu2", "default+relu2+softcap"]  # default: the baseline
    by_recipe = {r["recipe"]: r for r in rows}
    assert by_recipe["default"]["vs_default"] is None
    gap = by_recipe["default+relu2"]["vs_default"]
    assert gap["final"] == pytest.approx(by_recipe["default+relu2"]["mean"] - by_recipe["default"]["mean"])
    assert gap["verdict"] == "one seed each: no spread"
    report = (tmp_path / "report" / "ablate_t640.md").read_text()
    assert f"| default+relu2 | muon (0.02) | 64 | 1 | {by_recipe['default+relu2']['mean']:.3f} |" in report
    assert f"| {gap['final']:+.3f} |" in report
    assert "No GPT-2 recipe run of 2,048,000 tokens yet" in report  # its target: test_a_component_passes_only...
    commit = (git_state() or {}).get("commit")  # each run records the code and machine that trained it
    assert f"Runs per code commit: {commit[:7] if commit else 'unrecorded'} (3)." in report


def fake_run(recipe, seed, final, minutes=10.0):
    curve = [(0, 0.0, 10.0), (500, minutes / 2, final + 1.0), (1000, minutes, final)]  # (tokens, minutes, loss)
    return {"name": f"{recipe}_s{seed}", "recipe": recipe, "seed": seed, "batch_size": 4, "optimizer": "muon",
            "lr": 0.02, "steps": 10, "final_loss": final, "curve": curve, "minutes": minutes, "tokens_per_s": 100.0}


def finished_folder(root, name, final, argv):
    """A run folder as bench/ablate.py leaves it, without training: its command, curve and final score."""
    folder = root / name
    (folder / "eval").mkdir(parents=True)
    (folder / "ablate_argv.json").write_text(json.dumps(argv))
    rows = [{"type": "eval", "iter": 0, "time": 1.0, "val_loss": 10.0},
            {"type": "train", "iter": 10, "time": 60.0, "tokens_per_s": 400.0},
            {"type": "eval", "iter": 500, "time": 2400.0, "val_loss": final + 0.05}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "eval" / "owt_val_metrics.json").write_text(json.dumps({"scores": {"loss": final}}))


def test_recorded_runs_join_the_report_when_their_folders_are_gone(tmp_path):
    """A study spans sessions: runs whose out/ folders were lost still count from the report's .json
    kept in the repository, and a finished run on disk wins over its record."""
    def at_budget(run, tokens):
        return {**run, "name": run["name"].replace("_s", f"_t{tokens}_s"),
                "curve": [(n * tokens // 1000, m, loss) for n, m, loss in run["curve"]]}
    recorded = [at_budget(fake_run("default", 1, 6.0), 1024000), at_budget(fake_run("default+wsd", 1, 5.5), 1024000),
                at_budget(fake_run("default+relu2", 1, 5.4), 2048000)]  # another budget: not this report's
    (tmp_path / "screen.json").write_text(json.dumps({"tokens": 1024000, "runs": recorded}))
    argv = ablate.train_argv(ablate.parse_args(["--report-only", "--tokens", "1024000"]), "default", 1, 4, 1, "x")
    finished_folder(tmp_path / "runs", "default_t1024000_s1", 5.0, argv)
    args = ablate.parse_args(["--report-only", "--tokens", "1024000", "--out-root", str(tmp_path / "runs"),
                              "--recorded", str(tmp_path / "screen.json")])
    runs = ablate.collect(args, args.tokens)
    assert [(r["name"], r["final_loss"], r.get("recorded")) for r in runs] == [
        ("default_t1024000_s1", 5.0, None),  # on disk: the record of the same name is not used
        ("default+wsd_t1024000_s1", 5.5, str(tmp_path / "screen.json"))]
    rows = ablate.compare(ablate.summarize(runs), runs, None)
    md = ablate.markdown(args, runs, rows)
    assert "| default+wsd | muon (0.02) | 2,048 | 1 | 5.500 |" in md and "| +0.500 |" in md
    assert f"From recorded reports (their out/ folders absent here): {tmp_path / 'screen.json'} (1)." in md
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not an ablate report's .json"):
        ablate.collect(ablate.parse_args(["--report-only", "--recorded", str(tmp_path / "bad.json")]), 1024000)


def test_runs_stamped_before_the_schedule_was_spelled_out_are_reused_as_the_default(corpus, tmp_path, monkeypatch):
    """Until WSD became TrainConfig's default, `default` and `classic` left the schedule to it (cosine): a run
    stamped then is the same run as today's command, neither trained again nor taken for another recipe."""
    monkeypatch.setattr(ablate.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a[0][1]}"))
    args = ablate.parse_args(["--tokens", "1024000", "--seeds", "1", "--recipes", "classic,default",
                              "--data-dir", str(corpus), "--out-root", str(tmp_path / "runs")])
    for recipe in ("classic", "default"):
        name = ablate.run_name(recipe, 1, 4, 1, args.tokens)
        argv = ablate.train_argv(args, recipe, 1, 4, 1, os.path.join(args.out_root, name))
        assert "--lr_schedule=cosine" in argv  # spelled out now
        finished_folder(tmp_path / "runs", name, 5.0, [a for a in argv if a != "--lr_schedule=cosine"])
        (tmp_path / "runs" / name / "ckpt.pt").write_bytes(b"")
        os.utime(tmp_path / "runs" / name / "eval" / "owt_val_metrics.json", (2e9, 2e9))  # scored after the checkpoint
        ablate.run_one(args, {"name": name, "argv": argv, "iters": 500})
    assert [r["recipe"] for r in ablate.collect(args, args.tokens)] == ["classic", "default"]
    # WSD's own runs spelled their schedule out from the start: the base's cosine gives way to it
    assert ablate.recipe_flags("default+wsd") == [f for f in ablate.RECIPES["default"] if "lr_schedule" not in f] + [
        "--lr_schedule=wsd", "--cooldown_frac=0.4"]


def test_a_recorded_run_is_not_trained_again(corpus, tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(ablate, "run_one", lambda args, spec: trained.append(spec["name"]))
    done = {**fake_run("default", 1, 6.0), "name": "default_b2_t640_s1",
            "curve": [(0, 0.0, 10.0), (320, 1.0, 7.0), (640, 2.0, 6.0)]}
    (tmp_path / "kept.json").write_text(json.dumps({"tokens": 640, "runs": [done]}))
    ablate.main(tiny(corpus, tmp_path, "--seeds", "1", "--components", "wsd", "--recorded", str(tmp_path / "kept.json")))
    assert trained == ["default+wsd_b2_t640_s1"]  # the default's run of this budget and seed is the record's


@pytest.mark.parametrize("finals, verdict", [
    ((5.30, 5.31, 5.20), "better (> 0.020)"),  # 0.105 below default, beyond twice its seeds' 0.01
    ((5.30, 5.31, 5.29), "within 0.020"),
    ((5.30, 5.31, 5.40), "worse (> 0.020)"),
])
def test_a_component_passes_only_beyond_twice_the_seeds_spread_and_the_next_command_says_what_next(
        tmp_path, finals, verdict):
    runs = [fake_run("default", 1, finals[0]), fake_run("default", 2, finals[1]),
            fake_run("default+wsd", 1, finals[2], minutes=20.0)]
    target = ablate.classic_target([fake_run("classic", 1, 5.8)])
    rows = ablate.compare(ablate.summarize(runs), runs, target)
    gap = rows[1]["vs_default"]
    assert gap["verdict"] == verdict and gap["final"] == pytest.approx(finals[2] - finals[0])  # paired by seed
    # equal time: at 10 minutes the slower component run is halfway down its curve
    assert gap["equal_time"] == pytest.approx(finals[2] + 1.0 - finals[0])
    # tokens to the GPT-2 recipe's final loss (5.8), on each run's curve
    assert rows[1]["to_target"] == ablate.tokens_to_reach(runs[2]["curve"], 5.8)
    args = ablate.parse_args(["--report-only", "--tokens", "1024000", "--data-dir", str(tmp_path)])
    md = ablate.markdown(args, runs, rows, target)
    assert ("Next: `python bench/ablate.py --components wsd`" in md) == verdict.startswith("better")
    args = ablate.parse_args(["--report-only", "--data-dir", str(tmp_path)])
    assert ("--combine wsd" in ablate.markdown(args, runs, rows, target)) == verdict.startswith("better")


def test_every_component_is_a_valid_change_of_the_default_and_its_runs_are_recognized():
    from config import TrainConfig, parse_config
    default = vars(parse_config(TrainConfig, ablate.RECIPES["default"]))
    for name in ablate.COMPONENTS:
        recipe = f"default+{name}"
        changed = vars(parse_config(TrainConfig, ablate.recipe_flags(recipe)))
        assert changed != default, name  # a component that changes nothing would measure noise
        argv = dict(f[2:].split("=", 1) for f in ablate.recipe_flags(recipe))
        assert ablate.recipe_of(argv) == recipe
    everything = "+".join(["default", *ablate.COMPONENTS])
    assert ablate.recipe_of(dict(f[2:].split("=", 1) for f in ablate.recipe_flags(everything))) == everything
    for recipe in ablate.RECIPES:
        assert ablate.recipe_of(dict(f[2:].split("=", 1) for f in ablate.RECIPES[recipe])) == recipe


@pytest.mark.parametrize("extra, message", [
    (["--recipes", "llama"], "unknown recipe"),
    (["--components", "relu3"], "unknown component"),
    (["--combine", "relu2,gqa"], "unknown component"),
    (["--tokens", "650"], "not a whole number of steps"),
])
def test_bad_grids_get_one_line_errors(corpus, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        ablate.parse_args(tiny(corpus, tmp_path, *extra))


def test_the_ablated_recipes_are_the_presets_recipes():
    """What the ablation measures is what users train: `default+wsd` (recipe v2's winner) is
    config/pretrain_cpu.py as shipped, `default` the same with recipe v1's cosine, and `classic` the
    preset with config/gpt2_classic.py, so no side drifts from the README's table."""
    from config import TrainConfig, parse_config

    def settings(*argv):
        config = parse_config(TrainConfig, [os.path.join(ROOT, "config", "pretrain_cpu.py"), *argv])
        return {k: v for k, v in vars(config).items() if k != "explicit"}

    rates = [f"--learning_rate={ablate.ADAMW_LR}", f"--min_lr={ablate.ADAMW_LR / 10}"]
    muon = [f"--muon_lr={ablate.MUON_LR}", f"--muon_momentum={ablate.MUON_MOMENTUM}"]
    assert settings(*rates, *muon, *ablate.recipe_flags("default+wsd")) == settings()
    assert settings(*rates, *muon, *ablate.RECIPES["default"]) == settings("--lr_schedule=cosine")
    assert settings(*rates, *ablate.RECIPES["classic"]) == settings(os.path.join(ROOT, "config", "gpt2_classic.py"))
    preset = settings()
    assert ablate.PRESET_TOKENS == preset["max_iters"] * preset["batch_size"] * preset["block_size"]
