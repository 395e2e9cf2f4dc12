"""Architecture and optimizer ablation at CPU-preset scale: which modern options pay off?

Every config trains the same model size (n_layer 4, n_head 4, n_embd 256; blocks of 256 tokens,
batches of 8: 2,048 tokens per step) for the same number of steps on the same data (data/owt),
with the same seed, so the same batches in the same order, and the same warmup + cosine schedule
(AdamW 2e-3 -> 2e-4, the CPU preset; with Muon, muon_lr for the hidden matrices and the AdamW
rate for the rest). Each run is `train.py config/pretrain_cpu.py ...` in a subprocess (one
thread by default) with out_dir out/ablate/<name>. From each run's evaluation curve it reports
the final validation loss and the tokens it took to reach the baseline's final loss (linear
interpolation between evaluations; "not reached" if never).

Configs: gpt2 (the baseline: learned positions, LayerNorm, GELU, tied embeddings, biases), one
change each (rope, rmsnorm, swiglu, relu2, qk_norm), modern (rope + rmsnorm + the better of
swiglu / relu2 in this ablation + qk_norm + untied head + no biases), modern_muon (modern with
Muon), and, only when asked for, modern_lr4e-3 (modern at twice the AdamW rate).

    python bench/ablate.py --iters 250                       # all default configs
    python bench/ablate.py --iters 40 --configs gpt2,rope    # a subset
A config whose out_dir already holds a finished run of the same command is not rerun (--force
reruns); an interrupted one resumes. Writes out/bench/ablate.json and out/bench/ablate.md.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import UserError, atomic_path, run_main, write_json  # noqa: E402

BASE = ["config/pretrain_cpu.py", "--block_size=256", "--batch_size=8", "--gradient_accumulation_steps=1",
        "--learning_rate=2e-3", "--min_lr=2e-4", "--muon_lr=0.02", "--seed=1337", "--device=cpu",
        "--dtype=float32", "--dropout=0.0"]
MODERN = ["--pos_emb=rope", "--norm=rmsnorm", "--qk_norm=true", "--tie_embeddings=false", "--bias=false"]
# name -> (overrides, what it changes); "{mlp}" is the better MLP of swiglu / relu2
CONFIGS = {
    "gpt2": ([], "baseline: learned pos, LayerNorm, GELU, tied, bias"),
    "rope": (["--pos_emb=rope"], "+ RoPE"),
    "rmsnorm": (["--norm=rmsnorm"], "+ RMSNorm"),
    "swiglu": (["--mlp=swiglu"], "+ SwiGLU"),
    "relu2": (["--mlp=relu2"], "+ ReLU^2"),
    "qk_norm": (["--qk_norm=true"], "+ QK-norm"),
    "modern": (MODERN + ["--mlp={mlp}"], "RoPE + RMSNorm + {mlp} + QK-norm + untied + no bias"),
    "modern_muon": (MODERN + ["--mlp={mlp}", "--optimizer=muon"], "modern + Muon (hidden matrices)"),
    "modern_lr4e-3": (MODERN + ["--mlp={mlp}", "--learning_rate=4e-3", "--min_lr=4e-4"],
                      "modern, AdamW lr 4e-3 -> 4e-4"),
}
DEFAULT = ["gpt2", "rope", "rmsnorm", "swiglu", "relu2", "qk_norm", "modern", "modern_muon"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=250, help="optimizer steps per config (2,048 tokens each)")
    p.add_argument("--configs", default=",".join(DEFAULT), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default min(50, iters // 5))")
    p.add_argument("--evals", type=int, default=10, help="evaluations after iteration 0 (default 10)")
    p.add_argument("--eval-iters", type=int, default=20, help="validation batches per evaluation (default 20)")
    p.add_argument("--modern-mlp", choices=("swiglu", "relu2"),
                   help="MLP of the modern configs (default: the lower final loss of swiglu / relu2)")
    p.add_argument("--out-root", default="out/ablate", help="runs go to OUT_ROOT/<name>")
    p.add_argument("--force", action="store_true", help="rerun configs that already finished")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        raise UserError(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    if args.iters < args.evals:
        raise UserError(f"--iters ({args.iters}) must be at least --evals ({args.evals})")
    return args


def read_metrics(out_dir):
    path = os.path.join(ROOT, out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_curve(records):
    return [(r["iter"], r["val_loss"]) for r in records if r["type"] == "eval"]


def tokens_to_reach(curve, target, tokens_per_iter):
    """Tokens at which the evaluation curve first reaches target, interpolating linearly
    between the two evaluations around the crossing; None if it never does."""
    for (i0, l0), (i1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            frac = (l0 - target) / (l0 - l1) if l0 > target else 0.0
            return (i0 + frac * (i1 - i0)) * tokens_per_iter
    if curve and curve[0][1] <= target:
        return 0.0
    return None


def run_config(name, argv, args):
    out_dir = os.path.join(args.out_root, name)
    full = [*argv, f"--out_dir={out_dir}"]
    stamp = os.path.join(ROOT, out_dir, "ablate_argv.json")
    records = read_metrics(out_dir)
    done = eval_curve(records) and eval_curve(records)[-1][0] == args.iters
    if os.path.exists(stamp) and not args.force:
        with open(stamp) as f:
            same = json.load(f) == full
        if same and done:
            print(f"[{name}] already finished in {out_dir}: reusing", flush=True)
            return
    else:
        same = False
    os.makedirs(os.path.join(ROOT, out_dir), exist_ok=True)
    with atomic_path(stamp) as tmp:
        with open(tmp, "w") as f:
            json.dump(full, f)
    cmd = [sys.executable, "train.py", *full] + (["--resume"] if same and not args.force else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE",
           "MKL_NUM_THREADS": str(args.threads)}
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    with open(os.path.join(ROOT, out_dir, "train.log"), "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            step = re.match(r"iter (\d+)/", line)
            if ": val " in line or (step and int(step.group(1)) % 50 == 0) or line.startswith("error"):
                print(f"[{name}] {line.rstrip()}", flush=True)
        if proc.wait():
            raise UserError(f"{name}: train.py failed (exit {proc.returncode}); see {out_dir}/train.log")
    print(f"[{name}] done in {(time.time() - t0) / 60:.1f} min", flush=True)


def summarize(name, args, tokens_per_iter):
    records = read_metrics(os.path.join(args.out_root, name))
    curve = eval_curve(records)
    if not curve or curve[-1][0] != args.iters:
        raise UserError(f"{name}: no finished run in {args.out_root}/{name}")
    ms = [r["ms_per_iter"] for r in records if r["type"] == "train" and r["iter"] > 10]
    return {"name": name, "final_val_loss": curve[-1][1], "curve": curve,
            "ms_per_iter": round(statistics.median(ms), 1) if ms else None,
            "tokens": args.iters * tokens_per_iter}


def pick_mlp(args, tokens_per_iter):
    if args.modern_mlp:
        return args.modern_mlp, "set by --modern-mlp"
    finals = {}
    for mlp in ("swiglu", "relu2"):
        curve = eval_curve(read_metrics(os.path.join(args.out_root, mlp)))
        if curve and curve[-1][0] == args.iters:
            finals[mlp] = curve[-1][1]
    if not finals:
        return "swiglu", "swiglu (default: neither swiglu nor relu2 was run at this budget)"
    best = min(finals, key=finals.get)
    return best, f"{best} (final val " + ", ".join(f"{k} {v:.4f}" for k, v in finals.items()) + ")"


def fmt_tokens(n):
    return "not reached" if n is None else f"{n / 1e3:,.0f}k"


def main(argv=None):
    args = parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(50, args.iters // 5)
    eval_interval = max(1, args.iters // args.evals)
    common = BASE + [f"--max_iters={args.iters}", f"--warmup_iters={warmup}", f"--eval_interval={eval_interval}",
                     f"--eval_iters={args.eval_iters}", "--log_interval=10", f"--num_threads={args.threads}"]
    tokens_per_iter = 256 * 8
    command = "python bench/ablate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    order = [c for c in DEFAULT + list(CONFIGS) if c in args.configs]
    order = list(dict.fromkeys(order))  # single-change runs first: modern needs the MLP winner
    mlp, mlp_reason = "swiglu", ""
    started = time.time()
    for name in order:
        overrides, _ = CONFIGS[name]
        if "{mlp}" in " ".join(overrides):
            mlp, mlp_reason = pick_mlp(args, tokens_per_iter)
            print(f"[{name}] MLP: {mlp_reason}", flush=True)
        run_config(name, common + [o.replace("{mlp}", mlp) for o in overrides], args)
    rows = [summarize(name, args, tokens_per_iter) for name in order]
    base = next((r for r in rows if r["name"] == "gpt2"), None)
    if base is None:
        base_curve = eval_curve(read_metrics(os.path.join(args.out_root, "gpt2")))
        if base_curve and base_curve[-1][0] == args.iters:
            base = {"final_val_loss": base_curve[-1][1], "tokens": args.iters * tokens_per_iter}
    for r in rows:
        r["description"] = CONFIGS[r["name"]][1].replace("{mlp}", mlp)
        r["argv"] = common + [o.replace("{mlp}", mlp) for o in CONFIGS[r["name"]][0]]
        if base:
            r["delta_vs_baseline"] = r["final_val_loss"] - base["final_val_loss"]
            r["tokens_to_baseline"] = tokens_to_reach(r["curve"], base["final_val_loss"], tokens_per_iter)
            r["fraction_of_baseline_tokens"] = (r["tokens_to_baseline"] / base["tokens"]
                                                if r["tokens_to_baseline"] is not None else None)

    header = ("| config | change | final val loss | vs gpt2 | tokens to gpt2's final loss | share of gpt2's tokens "
              "| ms/iter |\n|---|---|---|---|---|---|---|")
    lines = []
    for r in rows:
        share = r.get("fraction_of_baseline_tokens")
        lines.append(f"| {r['name']} | {r['description']} | {r['final_val_loss']:.4f} | "
                     f"{r.get('delta_vs_baseline', float('nan')):+.4f} | {fmt_tokens(r.get('tokens_to_baseline'))} | "
                     f"{'-' if share is None else f'{share * 100:.0f}%'} | {r['ms_per_iter']} |")
    budget = (f"{args.iters} steps x {tokens_per_iter:,} tokens = {args.iters * tokens_per_iter / 1e6:.2f}M tokens per "
              f"config; warmup {warmup}, cosine to 0.1x; evaluation every {eval_interval} steps on "
              f"{args.eval_iters} fixed validation batches ({args.eval_iters * tokens_per_iter:,} tokens); "
              f"{args.threads} thread(s); modern MLP: {mlp_reason or mlp}")
    md = (f"# Ablation at CPU-preset scale\n\n`{command}`\n\n{budget}\n\n{header}\n" + "\n".join(lines) + "\n")
    print("\n" + md, flush=True)
    os.makedirs(os.path.join(ROOT, "out", "bench"), exist_ok=True)
    with atomic_path(os.path.join(ROOT, "out", "bench", "ablate.md")) as tmp:
        with open(tmp, "w") as f:
            f.write(md)
    write_json(os.path.join(ROOT, "out", "bench", "ablate.json"),
               {"command": command, "iters": args.iters, "tokens_per_iter": tokens_per_iter, "warmup": warmup,
                "eval_interval": eval_interval, "eval_iters": args.eval_iters, "threads": args.threads,
                "modern_mlp": mlp, "modern_mlp_reason": mlp_reason, "wall_min": round((time.time() - started) / 60, 1),
                "rows": rows})
    return rows


if __name__ == "__main__":
    run_main(main)
