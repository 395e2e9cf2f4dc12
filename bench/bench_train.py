"""Benchmark training speed: a bare hand loop against the shared training loop, and the output layer's share.

For one preset (default config/pretrain_cpu.py, with any --key=value overrides) it measures,
after warm-up, the median over --runs timed runs of --iters iterations each:

  fwd+bwd        forward and backward only
  lm_head+loss   the 50304-wide output layer and cross-entropy alone, forward and backward, from the
                 final hidden states: its share of fwd+bwd is what the vocabulary costs
  bare step      forward, backward, optimizer step (trainer.build_optimizers), zero_grad: no trainer
  train() loop   trainer.train itself (prefetch thread, LR schedule, clipping, logging), timed from
                 the ms_per_iter rows of its metrics.jsonl, one short train() call per run

with tokens/s, ms/iter, MFU (runtime.peak_flops: the GPU's datasheet peak, or on CPU the best
fp32 matmul rate measured during the benchmark) and peak memory (CUDA max_memory_allocated
during each phase's warm-up; on CPU the process's peak RSS so far, which only grows). The runs
are interleaved, one of each phase per round, so load that changes while the benchmark runs
(a shared machine) hits every phase alike. The target: the train() loop within 5% of the bare step.

    python bench/bench_train.py                                  # CPU preset, 1 thread
    python bench/bench_train.py config/pretrain_gpt2_124m_1gpu.py --device=cuda --compile=true
    python bench/bench_train.py --threads 2 --block_size=256 --batch_size=8

--compare-compile measures instead eager against torch.compile (inductor) in one run: two copies
of the model with the same weights and their own optimizers take whole steps (fwd, bwd, optimizer)
on the same batches, timed runs alternating; the compilation (the compiled model's first step) is
reported apart, and the two models' losses on every batch are compared:
    python bench/bench_train.py --compare-compile --runs 9 --iters 3      # CPU preset, 1 thread
Writes out/bench/train.json (--compare-compile: out/bench/compile.json).
"""
import argparse
import contextlib
import copy
import dataclasses
import io
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import torch
from torch.nn import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import trainer  # noqa: E402
from common import UserError, run_main, write_json  # noqa: E402
from config import TrainConfig, parse_config  # noqa: E402
from data import RandomTokens, TokenWindows  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from runtime import peak_flops, setup_runtime  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", nargs="?", default=os.path.join(ROOT, "config", "pretrain_cpu.py"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--iters", type=int, default=5, help="iterations per timed run")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--compare-compile", action="store_true",
                   help="instead: eager against torch.compile, the same weights and batches, timed runs interleaved")
    p.add_argument("--out", help="default out/bench/train.json (--compare-compile: out/bench/compile.json)")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        p.error(f"unexpected arguments {bad}; config overrides are --key=value")
    return args, overrides


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed_runs(fn, runs, iters, warmup, device):
    """Per-run ms/iter of `iters` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1000 / iters)
    return out


def row(name, ms_runs, tokens, flops, peak, device):
    ms = statistics.median(ms_runs)
    return {"name": name, "ms_per_iter": round(ms, 2), "tokens_per_s": round(tokens / ms * 1000, 1),
            "mfu": round(flops / (ms / 1000) / peak, 4) if peak and flops else None,
            "peak_mem_mib": round(peak_mib(device), 1),
            "runs_ms": [round(t, 2) for t in ms_runs]}


class Stepper:
    """One model's training steps over a fixed cycle of batches: trainer.train's forward, backward
    and optimizer step, without its schedule, clipping and logging. Each micro-batch's loss is kept
    (detached: no host sync)."""

    def __init__(self, fwd_model, model, cfg, rt, batches):
        self.fwd_model, self.model, self.rt, self.batches = fwd_model, model, rt, batches
        self.micro = cfg.gradient_accumulation_steps
        self.optimizers = trainer.build_optimizers(model, cfg, rt)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
        self.i, self.losses = 0, []

    def next_batch(self):
        self.i += 1
        return self.batches[self.i % len(self.batches)]

    def fwd_bwd(self):
        for _ in range(self.micro):
            x, y = self.next_batch()
            with self.rt.autocast():
                _, loss = self.fwd_model(x, targets=y)
            self.losses.append(loss.detach())
            self.scaler.scale(loss / self.micro).backward()

    def only_fwd_bwd(self):
        self.fwd_bwd()
        self.model.zero_grad(set_to_none=True)

    def step(self):
        self.fwd_bwd()
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)


def setup(args, overrides):
    """The preset's config and runtime, a batch source, a fresh model and the FLOPs of a step."""
    cfg = parse_config(TrainConfig, [args.preset, *overrides, f"--num_threads={args.threads}"])
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.num_threads, cfg.backend)
    if rt.ddp:
        raise UserError("run the benchmark as one process, not under torchrun")
    device = rt.device
    train_bin = os.path.join(cfg.data_dir, "train.bin")
    if os.path.isfile(train_bin):
        source = TokenWindows(train_bin, cfg.block_size, cfg.batch_size, cfg.seed)
    else:
        print(f"{train_bin} not found: timing on random tokens")
        source = RandomTokens(cfg.block_size, cfg.batch_size, cfg.seed)
    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**cfg.model_fields())).to(device)
    flops = model.flops_per_token(cfg.block_size) * tokens
    peak = peak_flops(device, cfg.peak_flops)
    batches = [tuple(t.to(device) for t in source.batch(i, 0)[:2]) for i in range(4)]
    print(f"{cfg.n_layer} layers, n_embd {cfg.n_embd}, block {cfg.block_size}, batch {cfg.batch_size} x "
          f"{cfg.gradient_accumulation_steps}: {tokens:,} tokens/iter, {model.num_params() / 1e6:.2f}M params, "
          f"{flops / 1e9:.1f} GFLOP/iter; {device}, {str(rt.dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} thread(s), peak {peak / 1e12:.3f} TFLOP/s", flush=True)
    return cfg, rt, source, model, batches, tokens, flops, peak


def print_rows(rows):
    print(f"\n{'':14} {'ms/iter':>10} {'tok/s':>10} {'MFU':>7} {'peak MiB':>9}   runs (ms/iter)")
    for r in rows:
        mfu = f"{r['mfu'] * 100:6.1f}%" if r["mfu"] is not None else "      -"
        print(f"{r['name']:14} {r['ms_per_iter']:10.1f} {r['tokens_per_s']:10.0f} {mfu} {r['peak_mem_mib']:9.0f}   "
              + " ".join(f"{t:.0f}" for t in r["runs_ms"]))


def bench(args, overrides):
    cfg, rt, source, model, batches, tokens, flops, peak = setup(args, overrides)
    device, micro = rt.device, cfg.gradient_accumulation_steps
    stepper = Stepper(torch.compile(model) if cfg.compile else model, model, cfg, rt, batches)

    # the output layer alone: final hidden states -> 50304 logits -> cross-entropy, fwd + bwd
    hidden = torch.randn(cfg.batch_size, cfg.block_size, cfg.n_embd, device=device, requires_grad=True)

    def head_loss():
        for _ in range(micro):
            x, y = stepper.next_batch()
            with rt.autocast():
                logits = model.head(hidden)
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
            stepper.scaler.scale(loss / micro).backward()
        hidden.grad = None
        model.zero_grad(set_to_none=True)

    runs, iters, warmup = args.runs, args.iters, args.warmup
    head_flops = 6 * cfg.n_embd * model.lm_head.weight.size(0) * tokens
    phases = {"fwd+bwd": stepper.only_fwd_bwd, "lm_head+loss": head_loss, "bare step": stepper.step}
    memory = {}
    for name, fn in phases.items():  # warm-up, and each phase's peak memory
        reset_peak(device)
        for _ in range(max(1, warmup)):
            fn()
        sync(device)
        memory[name] = peak_mib(device)

    # trainer.train, continuing on the same model with its own optimizers, in chunks: on CPU one
    # logged row per iteration after the first (which also holds the evaluation at iteration 0);
    # elsewhere a warm-up row of `iters` iterations, then one timed row (a sync per row only)
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    per_iter_log = device.type == "cpu"
    tcfg = dataclasses.replace(cfg, out_dir=tmp, resume=False, overwrite=True, eval_interval=10 ** 9, eval_iters=1,
                               max_iters=iters + 1 if per_iter_log else 2 * iters,
                               log_interval=1 if per_iter_log else iters)

    def train_chunk():
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train(tcfg, model, source, {"val": source}, rt)
        with open(os.path.join(tmp, "metrics.jsonl")) as f:
            logged = [r["ms_per_iter"] for r in map(json.loads, f) if r["type"] == "train"]
        return statistics.mean(logged[1:])

    reset_peak(device)
    train_chunk()
    memory["train() loop"] = peak_mib(device)
    # the same load hits every phase: one timed run of each per round, rounds interleaved
    timings = {name: [] for name in [*phases, "train() loop"]}
    peaks = [peak]
    t_start = time.perf_counter()
    for r in range(runs):
        for name, fn in phases.items():
            timings[name] += timed_runs(fn, 1, iters, 0, device)
        timings["train() loop"].append(train_chunk())
        if device.type == "cpu" and not cfg.peak_flops:
            peaks.append(peak_flops(device, cfg.peak_flops))  # the best rate seen: least disturbed
        print(f"round {r + 1}/{runs}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in timings.items()), flush=True)
    train_wall = time.perf_counter() - t_start
    shutil.rmtree(tmp, ignore_errors=True)
    peak = max(peaks)
    rows = []
    for name, ms in timings.items():
        rows.append(row(name, ms, tokens, head_flops if name == "lm_head+loss" else flops, peak, device))
        rows[-1]["peak_mem_mib"] = round(memory[name], 1)
    bare_row, train_row = rows[2], rows[3]
    ratio = train_row["ms_per_iter"] / bare_row["ms_per_iter"]
    head_share = rows[1]["ms_per_iter"] / rows[0]["ms_per_iter"]
    print_rows(rows)
    print(f"\ntrain() loop / bare step: {ratio:.3f} ({(ratio - 1) * 100:+.1f}%; target within +5%)")
    print(f"lm_head + cross-entropy: {head_share * 100:.1f}% of forward+backward "
          f"({head_flops / flops * 100:.1f}% of the FLOPs)")
    result = {"preset": os.path.relpath(args.preset, ROOT), "overrides": overrides, "device": str(device),
              "dtype": str(rt.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "compile": cfg.compile, "tokens_per_iter": tokens, "flops_per_iter": flops, "peak_flops": peak,
              "runs": runs, "iters_per_run": iters, "rows": rows, "train_over_bare": round(ratio, 4),
              "head_share_of_fwd_bwd": round(head_share, 4), "head_flops_share": round(head_flops / flops, 4),
              "bench_wall_s": round(train_wall, 1)}
    write_json(args.out, result)
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    return result


def compare_compile(args, overrides):
    """Eager against torch.compile (inductor): two copies of one model, each with its own optimizers,
    step through the same batches; their timed runs alternate (the order flips each round), and the
    compiled model's first step, which compiles it, is timed apart."""
    cfg, rt, _, model, batches, tokens, flops, peak = setup(args, [*overrides, "--compile=false"])
    twin = copy.deepcopy(model)
    steppers = {"eager": Stepper(model, model, cfg, rt, batches),
                "compiled": Stepper(torch.compile(twin), twin, cfg, rt, batches)}
    compile_s = timed_runs(steppers["compiled"].step, 1, 1, 0, rt.device)[0] / 1000
    steppers["eager"].step()  # the same first batch and update, so both stay in step
    print(f"compiled in {compile_s:.1f} s (the first step)", flush=True)
    for _ in range(args.warmup):
        for stepper in steppers.values():
            stepper.step()
    timings = {name: [] for name in steppers}
    for r in range(args.runs):
        for name in sorted(steppers, reverse=r % 2 == 1):
            timings[name] += timed_runs(steppers[name].step, 1, args.iters, 0, rt.device)
        print(f"round {r + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in timings.items()),
              flush=True)
    rows = [row(name, ms, tokens, flops, peak, rt.device) for name, ms in timings.items()]
    print_rows(rows)
    eager, compiled = (torch.stack(s.losses).float() for s in steppers.values())
    diff = (eager - compiled).abs()
    speedup = rows[0]["ms_per_iter"] / rows[1]["ms_per_iter"]
    print(f"\neager ms/iter / compiled ms/iter: {speedup:.3f} (above 1: compiled is faster); "
          f"compiling took {compile_s:.1f} s, once per run")
    print(f"loss on the same batches from the same weights, {len(diff)} micro-batches: max |eager - compiled| "
          f"{diff.max().item():.2e} (first {diff[0].item():.2e}, last {diff[-1].item():.2e}; "
          f"last loss {eager[-1].item():.4f})")
    result = {"preset": os.path.relpath(args.preset, ROOT), "overrides": overrides, "device": str(rt.device),
              "dtype": str(rt.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "tokens_per_iter": tokens, "runs": args.runs, "iters_per_run": args.iters, "rows": rows,
              "compiled_speedup": round(speedup, 4), "compile_s": round(compile_s, 2),
              "losses": {name: [round(v, 6) for v in losses.tolist()]
                         for name, losses in zip(steppers, (eager, compiled))},
              "max_loss_diff": diff.max().item()}
    write_json(args.out, result)
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    return result


def main(argv=None):
    args, overrides = parse_args(argv)
    if args.out is None:
        args.out = os.path.join(ROOT, "out", "bench", "compile.json" if args.compare_compile else "train.json")
    return (compare_compile if args.compare_compile else bench)(args, overrides)


if __name__ == "__main__":
    run_main(main)
