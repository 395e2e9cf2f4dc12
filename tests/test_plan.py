"""A run that fits the machine it is on: the micro-batch fitted to memory (batch_size=auto), a step
that runs out of memory rerun in pieces, the time budget (--max_minutes, SIGUSR1, --budget_hours),
and the plan a run prints and logs. The GPU's memory is stood in for by an injected limit
(tests/inject_fault.py): a forward pass over more rows raises torch.OutOfMemoryError, as CUDA's
allocator would."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import inject_fault
import train
import trainer
from checkpoint import load_checkpoint
from common import UserError
from config import TrainConfig, parse_config
from model import GPT, GPTConfig
from plan import TimeBudget
import runtime
from runtime import Runtime

from conftest import ROOT, TINY, stop_after

SEQUENCES = 12  # per step, with block_size 32: 384 tokens per step; micro-batches of 1, 2, 3, 4, 6 or 12
AUTO = TINY + ["--batch_size=auto", f"--tokens_per_step={SEQUENCES * 32}", "--dropout=0.1", "--eval_interval=4"]


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out_dir):
    return load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["model"]


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def limit_memory(monkeypatch, rows):
    monkeypatch.setattr(GPT, "forward", inject_fault.memory_limit(GPT.forward, rows))


# --- the micro-batch, fitted to memory ---------------------------------------------------------

def test_auto_takes_the_largest_micro_batch_that_fits_and_keeps_the_tokens_per_step(corpus, monkeypatch, capsys):
    """The probe tries real steps, keeps the largest micro-batch that fits, raises the accumulation so
    the tokens per step stay the configured ones, and puts every state back: the run ends with exactly
    the weights of a run started with that micro-batch (dropout on: the random state is restored too)."""
    args = AUTO + [f"--data_dir={corpus}", "--max_iters=6"]
    with monkeypatch.context() as m:
        limit_memory(m, 5)
        train.main(args + [f"--out_dir={corpus}/auto"])
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("batch_size=auto")][0]
    assert "micro-batch 4 sequences" in line and "out of memory" in line and "keeps 384 tokens per step" in line
    ckpt = load_checkpoint(str(corpus / "auto" / "ckpt.pt"))
    assert (ckpt["batch_plan"]["micro_batch"], ckpt["batch_plan"]["accumulation"]) == (4, 3)
    assert ckpt["batch_plan"]["chosen_by"] == "memory probe"
    plan = [r for r in metrics(corpus / "auto") if r["type"] == "plan"][0]
    assert (plan["micro_batch"], plan["accumulation"], plan["tokens_per_step"]) == (4, 3, SEQUENCES * 32)

    train.main(TINY + [f"--data_dir={corpus}", "--max_iters=6", "--dropout=0.1", "--eval_interval=4",
                       "--batch_size=4", "--gradient_accumulation_steps=3", f"--out_dir={corpus}/fixed"])
    assert same_weights(weights(corpus / "auto"), weights(corpus / "fixed"))


def test_a_resumed_auto_run_keeps_its_micro_batch_without_probing_again(corpus, monkeypatch):
    args = AUTO + [f"--data_dir={corpus}", "--max_iters=8"]
    with monkeypatch.context() as m:
        limit_memory(m, 5)
        train.main(args + [f"--out_dir={corpus}/full"])
        with monkeypatch.context() as m2:
            stop_after(m2, 3)
            with pytest.raises(SystemExit):
                train.main(args + [f"--out_dir={corpus}/cut"])
    tried = []  # a probe would try a size above the micro-batch
    with monkeypatch.context() as m:
        forward = GPT.forward
        m.setattr(GPT, "forward", lambda self, idx, *a, **k: tried.append(idx.size(0)) or forward(self, idx, *a, **k))
        train.main(args + [f"--out_dir={corpus}/cut", "--resume"])
    assert max(tried) == 4
    assert load_checkpoint(str(corpus / "cut" / "ckpt.pt"))["batch_plan"]["chosen_by"] == "checkpoint"
    assert same_weights(weights(corpus / "full"), weights(corpus / "cut"))


def test_an_explicit_batch_size_that_does_not_fit_names_the_largest_that_does(corpus, monkeypatch):
    with monkeypatch.context() as m:
        limit_memory(m, 5)
        with pytest.raises(UserError, match=r"batch_size=6 does not fit .* the largest micro-batch that fits is "
                                            r"4: pass --batch_size=4 \(or --batch_size=auto\)"):
            train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=4", "--batch_size=6",
                               f"--tokens_per_step={SEQUENCES * 32}"])


def test_running_out_of_memory_later_reruns_the_step_in_pieces_and_loses_nothing(corpus, monkeypatch, capsys):
    """The 5th training forward pass (the 2nd micro-batch of step 2, with the 1st one's gradient already
    accumulated) runs out of memory: the step is rerun from its first micro-batch in two pieces each,
    on the same sequences, and the run ends where the unhindered run ends."""
    args = TINY + [f"--data_dir={corpus}", "--max_iters=6", "--batch_size=4", f"--tokens_per_step={SEQUENCES * 32}",
                   "--eval_interval=3"]
    train.main(args + [f"--out_dir={corpus}/plain"])
    with monkeypatch.context() as m:
        m.setattr(GPT, "forward", inject_fault.out_of_memory_at(GPT.forward, 5))
        train.main(args + [f"--out_dir={corpus}/oom"])
    assert "out of memory at step 2: each micro-batch of 4 sequences now runs as 2 pieces" in capsys.readouterr().out
    assert load_checkpoint(str(corpus / "oom" / "ckpt.pt"))["batch_plan"]["pieces"] == 2
    steps = lambda d: [r["iter"] for r in metrics(d) if r["type"] == "train"]
    assert steps(corpus / "oom") == steps(corpus / "plain") == list(range(1, 7))
    plain, oom = weights(corpus / "plain"), weights(corpus / "oom")
    # the same gradients, summed in another order: equal to rounding (a lost or doubled micro-batch is not)
    assert all(torch.allclose(plain[k], oom[k], rtol=0, atol=1e-5) for k in plain)


def test_running_out_of_memory_in_the_optimizer_step_is_one_line_naming_a_smaller_micro_batch(corpus, monkeypatch):
    """Some parameters may already be updated: the step cannot be rerun, the last checkpoint is kept."""
    step, calls = torch.optim.AdamW.step, []

    def adamw_step(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:  # the third step
            raise inject_fault.out_of_memory(0)
        return step(self, *args, **kw)
    monkeypatch.setattr(torch.optim.AdamW, "step", adamw_step)
    with pytest.raises(UserError, match=r"out of memory in the optimizer step of step 3; .*ckpt.pt is the last good "
                                        r"state: rerun with --resume --batch_size=3"):
        train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=6", "--batch_size=4",
                           f"--tokens_per_step={SEQUENCES * 32}", "--eval_interval=2", "--optimizer=adamw"])
    assert load_checkpoint(str(corpus / "o" / "ckpt.pt"))["iter_num"] == 2


def test_the_batch_settings_are_checked_with_one_line(corpus):
    cases = [
        (["--batch_size=auto"], "batch_size=auto needs tokens_per_step"),
        (["--batch_size=lots"], "--batch_size expects int or auto"),
        (["--tokens_per_step=100"], "tokens_per_step=100 must be a multiple of block_size=32"),
        (["--budget_hours=-1"], "max_minutes and budget_hours must be >= 0"),
    ]
    for extra, message in cases:
        with pytest.raises(UserError, match=message):
            parse_config(TrainConfig, TINY + extra)
    run = TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=2"]
    with pytest.raises(UserError, match="gradient_accumulation_steps follows from tokens_per_step"):
        train.main(run + ["--tokens_per_step=384", "--gradient_accumulation_steps=2"])
    with pytest.raises(UserError, match="not a multiple of batch_size=5"):
        train.main(run + ["--tokens_per_step=384", "--batch_size=5"])
    with pytest.raises(UserError, match="budget_hours .* needs warmup_iters >= 2"):
        train.main(run + ["--budget_hours=1", "--warmup_iters=1"])


# --- the time budget ---------------------------------------------------------------------------

def fast_clock(monkeypatch, factor):
    """The trainer's clock, running `factor` times faster than real time."""
    start, real = time.perf_counter(), time.perf_counter
    monkeypatch.setattr(trainer, "clock", lambda: start + (real() - start) * factor)


def test_max_minutes_stops_with_a_checkpoint_in_time_and_resume_ends_as_if_never_stopped(corpus, monkeypatch, capsys):
    args = TINY + [f"--data_dir={corpus}", "--max_iters=30", "--eval_interval=10", "--dropout=0.1"]
    train.main(args + [f"--out_dir={corpus}/full"])
    with monkeypatch.context() as m:
        fast_clock(m, 3000)  # a real second is 50 minutes: the 5-minute budget ends after a few steps
        with pytest.raises(SystemExit) as stopped:
            train.main(args + [f"--out_dir={corpus}/cut", "--max_minutes=5"])
    assert stopped.value.code == trainer.STOPPED_FOR_TIME
    assert "--max_minutes=5 is near); rerun with --resume" in capsys.readouterr().out
    stopped_at = load_checkpoint(str(corpus / "cut" / "ckpt.pt"))["iter_num"]
    assert 1 <= stopped_at < 30
    train.main(args + [f"--out_dir={corpus}/cut", "--max_minutes=5", "--resume"])  # a new session, real time
    assert same_weights(weights(corpus / "full"), weights(corpus / "cut"))


def test_max_minutes_leaves_room_for_the_next_steps_an_evaluation_and_a_checkpoint():
    cfg = parse_config(TrainConfig, ["--max_minutes=10", "--log_interval=10", "--eval_interval=100"])
    now = [0.0]
    budget = TimeBudget(cfg, clock=lambda: now[0])
    budget.timed("save", 20.0)
    budget.timed("eval", 30.0)
    now[0] = 600 - 1.1 * (10 * 2.0 + 20.0) - 1  # 10 more steps of 2 s and a checkpoint still fit
    assert not budget.should_stop(50, step_s=2.0)
    now[0] += 2
    assert budget.should_stop(50, step_s=2.0)
    now[0] = 600 - 1.1 * (10 * 2.0 + 20.0) - 1  # but not when an evaluation falls due before the next check
    assert budget.should_stop(95, step_s=2.0)


def test_sigusr1_stops_like_sigterm_and_the_signal_handlers_are_put_back(corpus, monkeypatch):
    """SLURM's --signal=USR1@120 warns a job before its time is up. It reaches a torchrun worker twice
    (from SLURM and from torchrun passing it on): a repeat is the same request, not an abort."""
    args = TINY + [f"--data_dir={corpus}", "--max_iters=12", "--eval_interval=5", "--dropout=0.1"]
    train.main(args + [f"--out_dir={corpus}/full"])
    measure = trainer.Throughput.measure

    def measure_then_signal(self, it, max_iters):
        if it == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)
        return measure(self, it, max_iters)
    before = signal.getsignal(signal.SIGUSR1)
    with monkeypatch.context() as m:
        m.setattr(trainer.Throughput, "measure", measure_then_signal)
        with pytest.raises(SystemExit) as stopped:
            train.main(args + [f"--out_dir={corpus}/cut"])
    assert stopped.value.code == trainer.STOPPED_BY_SIGNAL
    assert load_checkpoint(str(corpus / "cut" / "ckpt.pt"))["iter_num"] == 3
    assert signal.getsignal(signal.SIGUSR1) == before
    train.main(args + [f"--out_dir={corpus}/cut", "--resume"])
    assert same_weights(weights(corpus / "full"), weights(corpus / "cut"))


def test_budget_hours_plans_max_iters_before_the_decay_and_a_resumed_run_keeps_it(corpus, monkeypatch):
    args = TINY + [f"--data_dir={corpus}", "--max_iters=5", "--warmup_iters=6", "--eval_interval=8",
                   "--budget_hours=0.5", f"--out_dir={corpus}/o"]
    with monkeypatch.context() as m:
        fast_clock(m, 300)  # 30 minutes of budget go by in 6 real seconds
        stop_after(m, 8)
        with pytest.raises(SystemExit):
            train.main(args)
        planned = [r for r in metrics(corpus / "o") if r["type"] == "plan" and "budget_hours" in r][0]
        # decided at the warmup's end at the latest, from steps after the first (which compiles)
        assert planned["measured"] == [2, 6]
        left, per_step = planned["seconds_left"], planned["step_s"] + (planned["eval_s"] + planned["save_s"]) / 8
        assert planned["max_iters"] == 6 + math.floor((left - planned["eval_s"] - planned["save_s"]) / per_step)
        assert 8 < planned["max_iters"] < 10_000
        ckpt = load_checkpoint(str(corpus / "o" / "ckpt.pt"))
        assert ckpt["time_plan"]["max_iters"] == ckpt["config"]["max_iters"] == planned["max_iters"]
        train.main(args + ["--resume"])  # a new session: the plan is kept, not made again
    assert load_checkpoint(str(corpus / "o" / "ckpt.pt"))["iter_num"] == planned["max_iters"]
    assert len([r for r in metrics(corpus / "o") if r["type"] == "plan" and "budget_hours" in r]) == 1


# --- the plan, printed and logged --------------------------------------------------------------

def test_the_plan_and_the_live_record(corpus, capsys):
    train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=4", "--eval_interval=4"])
    out = capsys.readouterr().out
    plan = [r for r in metrics(corpus / "o") if r["type"] == "plan"][0]
    model = GPT(GPTConfig(**load_checkpoint(str(corpus / "o" / "ckpt.pt"))["model_config"]))
    assert plan["params"] == sum(p.numel() for p in model.parameters())
    assert model.wpe is None  # RoPE: the token table is the only embedding
    assert plan["non_embedding_params"] == plan["params"] - model.wte.weight.numel()
    assert (plan["tokens_per_step"], plan["steps"], plan["tokens"]) == (64, 4, 256)
    assert plan["train_flops"] > 6 * plan["non_embedding_params"] * plan["tokens"]
    # the size announced for ckpt.pt is the size written (weights and Muon/AdamW state), to 2%
    assert plan["ckpt_bytes"] == pytest.approx(os.path.getsize(corpus / "o" / "ckpt.pt"), rel=0.02)
    assert out.count("plan: ") == 1 and "tokens per step" in out
    for row in (r for r in metrics(corpus / "o") if r["type"] == "train"):
        assert row["eta_s"] >= 0 and row["peak_mem_mib"] > 0
    assert "eta 0.0 min (" in out and "peak " in out


# --- several processes -------------------------------------------------------------------------

def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(*argv, fault=None, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(ROOT / "tests" / "inject_fault.py"), fault] if fault else []
    return subprocess.run(cmd + list(argv), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def test_under_torchrun_a_process_that_runs_out_of_memory_reruns_its_micro_batches_alone(corpus):
    """Rank 1's 3rd forward pass (step 2's first micro-batch, whose backward does not all-reduce) runs
    out of memory: it reruns its share in pieces, the all-reduce still pairs up, and the replicas stay
    identical."""
    args = ["train.py", *TINY, f"--data_dir={corpus}", "--max_iters=4", "--eval_interval=100", "--batch_size=2",
            "--tokens_per_step=256", f"--out_dir={corpus}/ddp"]
    result = torchrun(*args, fault="oom:3@1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 1: out of memory at step 2" in result.stdout
    ranks = [r for r in metrics(corpus / "ddp") if r["type"] == "ranks"][0]["ranks"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["dropout"] != ranks[1]["dropout"]  # each process draws its own dropout masks


def test_a_process_that_cannot_see_the_checkpoint_fails_with_one_line_not_a_hang(corpus):
    args = ["train.py", *TINY, f"--data_dir={corpus}", "--eval_interval=2", "--gradient_accumulation_steps=2",
            f"--out_dir={corpus}/o"]
    train.main(args[1:] + ["--max_iters=2"])
    started = time.time()
    result = torchrun(*args, "--max_iters=4", "--resume", fault="hide:0@1", timeout=120)
    assert result.returncode != 0 and time.time() - started < 120
    assert "rank 0 resumes" in result.stderr and "but rank 1 on " in result.stderr
    assert "put out_dir on storage that every node shares" in result.stderr


def test_under_ddp_the_compiled_module_wraps_ddp(monkeypatch):
    """So that dynamo splits the graph at DDP's buckets and the all-reduce overlaps the backward pass."""
    class FakeDDP(torch.nn.Module):  # DDP itself needs a process group
        def __init__(self, module, **kw):
            super().__init__()
            self.module = module

    monkeypatch.setattr(trainer, "DDP", FakeDDP)
    monkeypatch.setattr(runtime, "compile_blocker", lambda *device_and_dtype: None)  # nothing compiles until called
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    rt = Runtime(torch.device("cpu"), rank=0, world_size=2)
    trained, evaluated = trainer.wrap_for_training(model, rt, compile_wanted=True)
    assert isinstance(trained, torch._dynamo.eval_frame.OptimizedModule) and isinstance(trained._orig_mod, FakeDDP)
    assert trained._orig_mod.module is model and evaluated._orig_mod is model  # evaluation outside DDP
    trained, evaluated = trainer.wrap_for_training(model, rt, compile_wanted=False)
    assert isinstance(trained, FakeDDP) and evaluated is model


def test_each_process_seeds_its_own_dropout():
    masks = {}
    for rank in (0, 1, 1):
        trainer.seed_process(1337, rank)
        mask = torch.nn.functional.dropout(torch.ones(256), 0.5)
        assert masks.setdefault(rank, mask).equal(mask)  # the same rank draws the same masks
    assert not masks[0].equal(masks[1])
