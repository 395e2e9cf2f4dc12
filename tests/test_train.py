"""Pretraining: configs are validated, runs resume exactly, torchrun DDP keeps replicas in sync."""
import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
import trainer
from checkpoint import load_checkpoint
from common import UserError
from config import FinetuneConfig, TrainConfig, parse_config
from model import GPT, GPTConfig

from conftest import ROOT, TINY, stop_after


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=False)["model"]


# --- configuration ---------------------------------------------------------------------------

def test_presets_and_overrides_are_typed():
    cfg = parse_config(TrainConfig, ["config/pretrain_cpu.py", "--n_layer=2", "--compile", "--dropout", "0.1"])
    assert (cfg.n_layer, cfg.compile, cfg.dropout, cfg.block_size) == (2, True, 0.1, 512)
    assert parse_config(TrainConfig, ["--learning-rate=1e-3"]).learning_rate == 1e-3
    # presets apply in order: an overlay changes only what it names
    classic = parse_config(TrainConfig, ["config/pretrain_cpu.py", "config/gpt2_classic.py", "--max_iters=7"])
    assert (classic.pos_emb, classic.optimizer, classic.block_size, classic.max_iters) == ("learned", "adamw", 512, 7)


@pytest.mark.parametrize("preset", ["config/pretrain_cpu.py", "config/pretrain_gpt2_124m_1gpu.py",
                                    "config/pretrain_gpt2_124m.py", "config/pretrain_smoke.py"])
def test_every_pretraining_preset_trains_the_ablation_winner_and_gpt2_is_one_overlay_away(preset):
    default = parse_config(TrainConfig, [preset])
    assert (default.pos_emb, default.norm, default.mlp, default.qk_norm, default.tie_embeddings, default.bias,
            default.optimizer) == ("rope", "rmsnorm", "swiglu", True, False, False, "muon")
    classic = parse_config(TrainConfig, [preset, "config/gpt2_classic.py"])
    gpt2 = GPTConfig()  # the dataclass defaults are GPT-2's architecture
    assert (classic.pos_emb, classic.norm, classic.mlp, classic.qk_norm, classic.tie_embeddings, classic.bias,
            classic.optimizer) == (gpt2.pos_emb, gpt2.norm, gpt2.mlp, gpt2.qk_norm, gpt2.tie_embeddings, gpt2.bias,
                                   "adamw")
    # the overlay changes the recipe only: shape, budget and rates stay the preset's
    same = ("n_layer", "n_embd", "block_size", "batch_size", "max_iters", "learning_rate", "out_dir")
    assert [getattr(classic, k) for k in same] == [getattr(default, k) for k in same]


@pytest.mark.parametrize("argv, message", [
    (["--n_layers=3"], "unknown option --n_layers; valid keys: "),
    (["--n_layer=three"], "--n_layer expects int, got 'three'"),
    (["--compile=maybe"], "--compile expects true or false"),
    (["config/nope.py"], "config file config/nope.py not found"),
    (["--norm=batchnorm"], "bad config: norm='batchnorm'; choose one of"),
])
def test_bad_config_is_a_clear_error(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse_config(TrainConfig, argv)


def test_preset_file_with_unknown_key_or_wrong_type(tmp_path):
    bad_key = tmp_path / "bad_key.py"
    bad_key.write_text("n_layer = 2\nlearning_rat = 1e-3\n")
    with pytest.raises(UserError, match="unknown key 'learning_rat'; valid keys: .*learning_rate"):
        parse_config(TrainConfig, [str(bad_key)])
    bad_type = tmp_path / "bad_type.py"
    bad_type.write_text("n_layer = '2'\n")
    with pytest.raises(UserError, match="n_layer must be int, got str"):
        parse_config(TrainConfig, [str(bad_type)])


def test_finetune_config_has_its_own_keys_and_the_shared_ones():
    cfg = parse_config(FinetuneConfig, ["--init_from=x.pt", "--replay_fraction=0.2", "--n_layer=3"])
    assert (cfg.init_from, cfg.replay_fraction, cfg.n_layer) == ("x.pt", 0.2, 3)
    with pytest.raises(UserError, match="unknown option --replay_fraction"):
        parse_config(TrainConfig, ["--replay_fraction=0.2"])
    assert parse_config(TrainConfig, []).init_from == ""  # pretraining starts from scratch unless told


def test_missing_data_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "config/pretrain_smoke.py", f"--data_dir={tmp_path}/none"],
                            cwd=ROOT, env=env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}/none/train.bin not found; run prepare_owt.py (or point data_dir at its output)"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_file_of_odd_length_is_a_one_line_error(corpus, split):
    with open(corpus / f"{split}.bin", "ab") as f:
        f.write(b"\x00")  # a copy cut mid-token
    with pytest.raises(UserError, match=f"{split}.bin has an odd number of bytes, so it is not whole uint16"):
        train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/out"])


def test_cosine_learning_rate_warms_up_then_decays_to_min():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, lr_schedule="cosine")
    lrs = [trainer.lr_at(i, cfg, 1.0) for i in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[60] == pytest.approx(0.55)  # halfway through the decay, halfway down
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


# --- training ----------------------------------------------------------------------------------

def test_training_lowers_loss_and_writes_checkpoints_and_metrics(corpus):
    out = corpus / "out"
    train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={out}", "--max_iters=30", "--eval_interval=10"])
    records = read_metrics(out)
    evals = [r["val_loss"] for r in records if r["type"] == "eval"]
    assert len(evals) == 4 and evals[-1] < evals[0] - 1.0  # iterations 0, 10, 20, 30
    train_rows = [r for r in records if r["type"] == "train"]
    assert [r["iter"] for r in train_rows] == list(range(1, 31))
    assert all(r["tokens_per_s"] > 0 and "mfu" in r for r in train_rows)
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 30 and ckpt["config"]["n_embd"] == 32
    assert (out / "best.pt").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_interrupted_run_resumes_exactly(corpus):
    """Stopped by SIGTERM at any step and resumed, a run ends with the same weights and losses
    as an uninterrupted one."""
    args = TINY + [f"--data_dir={corpus}", "--max_iters=16", "--eval_interval=5", "--dropout=0.1"]
    train.main(args + [f"--out_dir={corpus}/full"])

    cmd = [sys.executable, "train.py"] + args + [f"--out_dir={corpus}/cut"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # stop it as soon as it is really training
        if line.startswith("iter 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    output = line + proc.stdout.read()
    assert proc.wait(timeout=120) == 130, output
    stopped_at = torch.load(corpus / "cut" / "ckpt.pt", weights_only=False)["iter_num"]
    assert 3 <= stopped_at < 16, output

    train.main(args + [f"--out_dir={corpus}/cut", "--resume"])
    full, cut = final_weights(corpus / "full"), final_weights(corpus / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    losses = lambda d: [(r["iter"], r.get("loss", r.get("val_loss"))) for r in read_metrics(d)
                        if r["type"] in ("train", "eval")]
    assert losses(corpus / "cut") == losses(corpus / "full")
    times = [r["time"] for r in read_metrics(corpus / "cut")]
    assert times == sorted(times)  # training time continues across the resume: curves vs time stay whole


@pytest.mark.parametrize("preset", ["config/finetune_cpu.py", "config/finetune_gpu.py", "config/finetune_smoke.py"])
def test_finetuning_keeps_adamw_whatever_the_pretraining_optimizer(preset):
    assert parse_config(TrainConfig, []).optimizer == "muon"
    assert parse_config(FinetuneConfig, [preset]).optimizer == "adamw"


def test_resume_with_a_different_model_shape_is_a_clear_error(corpus):
    train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=2"])
    with pytest.raises(UserError, match=r"does not fit the configured model \(shape of .*\); use the same"):
        train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=4", "--n_embd=64",
                           "--resume"])


def test_resuming_a_gpt2_recipe_run_without_its_overlay_names_the_overlay(corpus):
    """A run started before the default became the ablation's winner, or with the overlay."""
    train.main(TINY + ["config/gpt2_classic.py", f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=2"])
    with pytest.raises(UserError, match=r"does not fit the configured model .*add config/gpt2_classic.py"):
        train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=4", "--resume",
                           "--optimizer=adamw"])


def test_resume_with_another_optimizer_is_a_clear_error(corpus):
    """The default recipe trains with Muon and config/gpt2_classic.py with AdamW: reusing a folder
    across the two must say so, not fail deep inside load_state_dict."""
    train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=2", "--optimizer=adamw"])
    with pytest.raises(UserError, match=r"was trained with optimizer=adamw, not muon; resume it with --optimizer=adamw"):
        train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=4", "--resume"])


@pytest.mark.parametrize("optimizer, extra", [
    ("adamw", []),
    # RoPE has a buffer, and one evaluation batch leaves the second process nothing to score:
    # neither may make the processes' collectives disagree (a hang)
    ("muon", ["--pos_emb=rope", "--eval_iters=1", "--eval_interval=3"]),
])
def test_torchrun_two_processes_see_different_data_and_stay_in_sync(corpus, optimizer, extra):
    args = TINY + [f"--data_dir={corpus}", "--max_iters=6", "--eval_interval=100", "--gradient_accumulation_steps=2",
                   f"--optimizer={optimizer}", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    result = subprocess.run(cmd + args + [f"--out_dir={corpus}/ddp"], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [r for r in read_metrics(corpus / "ddp") if r["type"] == "ranks"][0]["ranks"]
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # the two processes together draw the batches one process draws with 2 micro-steps
    train.main(args + [f"--out_dir={corpus}/single"])
    ddp, single = final_weights(corpus / "ddp"), final_weights(corpus / "single")
    assert all(torch.allclose(ddp[k], single[k], atol=1e-5) for k in ddp)


# --- safety and the command line ----------------------------------------------------------------

def test_every_model_field_is_a_command_line_option():
    cfg = parse_config(TrainConfig, ["--pos_emb=rope", "--rope_base=500", "--n_embd=64", "--n_head=4"])
    model = GPT(GPTConfig(**cfg.model_fields()))
    assert cfg.rope_base == 500.0 and model.inv_freq[1].item() == pytest.approx(500 ** (-2 / 16))
    assert set(cfg.model_fields()) == {f.name for f in dataclasses.fields(GPTConfig)}


def test_help_lists_every_key_with_type_default_and_meaning():
    result = subprocess.run([sys.executable, "finetune.py", "--help"], cwd=ROOT, env=env(), capture_output=True,
                            text=True)
    assert result.returncode == 0
    for f in dataclasses.fields(FinetuneConfig):
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(f"--{f.name}="))
        assert f"default {f.default!r}" in line
    assert "init_from=str" in result.stdout and "the pretrained checkpoint to start from" in result.stdout


def test_a_run_is_never_overwritten_without_being_asked(corpus):
    args = TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=2"]
    train.main(args)
    before = (corpus / "o" / "ckpt.pt").read_bytes()
    with pytest.raises(UserError, match=r"already holds a run \(ckpt.pt\); pass --resume .*--overwrite"):
        train.main(args + ["--max_iters=3"])
    assert (corpus / "o" / "ckpt.pt").read_bytes() == before
    train.main(args + ["--max_iters=3", "--overwrite"])
    assert torch.load(corpus / "o" / "ckpt.pt", weights_only=False)["iter_num"] == 3


def test_a_damaged_checkpoint_is_refused(corpus):
    train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=1"])
    path = corpus / "o" / "best.pt"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the token embedding, most of the file
    data[middle:middle + 5000] = bytes(b ^ 0xFF for b in data[middle:middle + 5000])
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="is damaged"):
        load_checkpoint(str(path))


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(corpus, monkeypatch):
    calls = {"n": 0}
    forward = GPT.forward

    def failing(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        calls["n"] += 1
        return logits, loss * float("nan") if calls["n"] > 6 and self.training else loss

    monkeypatch.setattr(GPT, "forward", failing)
    with pytest.raises(UserError, match=r"loss became nan or inf at iteration 4; .*ckpt.pt is the last good"):
        train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=10", "--eval_interval=3"])
    ckpt = load_checkpoint(str(corpus / "o" / "ckpt.pt"))  # 2 eval batches at iterations 0 and 3
    assert ckpt["iter_num"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_run_stopped_at_an_evaluation_step_keeps_that_evaluation(corpus, monkeypatch):
    args = TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=8", "--eval_interval=4"]
    with monkeypatch.context() as m:
        stop_after(m, 4)  # the stop request arrives at step 4, when evaluation 4 is due
        with pytest.raises(SystemExit):
            train.main(args)
    train.main(args + ["--resume"])
    assert [r["iter"] for r in read_metrics(corpus / "o") if r["type"] == "eval"] == [0, 4, 8]


def test_a_run_resumes_in_another_precision(corpus):
    args = TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o"]
    train.main(args + ["--max_iters=2", "--dtype=bfloat16"])
    train.main(args + ["--max_iters=3", "--dtype=float16", "--resume"])  # now with a GradScaler
    assert load_checkpoint(str(corpus / "o" / "ckpt.pt"))["iter_num"] == 3


def test_a_run_resumed_from_its_first_checkpoint_logs_each_evaluation_once(corpus, monkeypatch):
    args = TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--eval_interval=3", "--max_iters=3"]
    with monkeypatch.context() as m:  # killed in the first step: only the evaluation at 0 and its checkpoint
        m.setattr(trainer.Run, "step", lambda self, batches: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train.main(args)
    assert load_checkpoint(str(corpus / "o" / "ckpt.pt"))["iter_num"] == 0
    train.main(args + ["--resume"])
    assert [r["iter"] for r in read_metrics(corpus / "o") if r["type"] == "eval"] == [0, 3]


# --- MFU on CPU ----------------------------------------------------------------------------------

def test_cpu_peak_is_the_best_of_repeated_timings_at_the_configured_thread_count(monkeypatch):
    import runtime
    seen, rates = [], iter([2e9, 5e9, 3e9, 1e9, 4e9])

    def timed():
        seen.append(torch.get_num_threads())
        return next(rates)
    monkeypatch.setattr(runtime, "matmul_rate", timed)
    before = torch.get_num_threads()
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    speed = trainer.Throughput(TrainConfig(block_size=32, num_threads=3), model, runtime.Runtime(torch.device("cpu")),
                               1.0, 0)
    assert speed.peak == 5e9 and seen == [3] * 5  # the best of five, timed at the run's threads
    assert torch.get_num_threads() == before  # and the process keeps its own count


def test_mfu_over_100_percent_re_measures_the_cpu_peak_at_least_as_high_as_the_run_achieved(monkeypatch):
    import runtime
    now, rates = [0.0], [1e9]  # the start's timings: slowed by another job
    monkeypatch.setattr(trainer, "clock", lambda: now[0])
    monkeypatch.setattr(runtime, "matmul_rate", lambda: rates[0])
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    speed = trainer.Throughput(TrainConfig(block_size=32, num_threads=1), model, runtime.Runtime(torch.device("cpu")),
                               1.0, 0)
    flops = speed.flops_per_iter
    now[0] = 10 * flops / 2e9  # 10 steps at 2e9 FLOP/s: "mfu 200%"
    rates[0] = 4e9  # the other job has ended: the peak measured again is the CPU's own
    first = speed.measure(10, 100)
    assert first["peak_flops"] == 4e9 and first["mfu"] == pytest.approx(0.5)
    assert "mfu 50.0% (mfu >100%: CPU peak re-measured)" in trainer.log_line(10, 100, 2.0, 1e-3, first)
    now[0] += 10 * flops / 3e9
    second = speed.measure(20, 100)
    assert second["mfu"] == pytest.approx(0.75) and "peak_flops" not in second
    rates[0] = 1e9  # the measurement is slowed again, yet the run went at 6e9: the peak is at least that
    now[0] += 10 * flops / 6e9
    third = speed.measure(30, 100)
    assert third["peak_flops"] == pytest.approx(6e9) and third["mfu"] == pytest.approx(1.0)


def test_no_logged_mfu_passes_100_percent_on_cpu(corpus, monkeypatch, capsys):
    import runtime
    monkeypatch.setattr(runtime, "matmul_rate", lambda: 1e3)  # a peak timed under heavy load: far too low
    out = corpus / "out"
    train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={out}", "--max_iters=8", "--eval_interval=8",
                       "--num_threads=1"])
    rows = [r for r in read_metrics(out) if r["type"] == "train"]
    assert len(rows) == 8 and all(0 < r["mfu"] <= 1.0 for r in rows)
    assert rows[0]["peak_flops"] > 1e3 and "mfu >100%: CPU peak re-measured" in capsys.readouterr().out
