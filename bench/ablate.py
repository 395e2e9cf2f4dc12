"""Which recipe should the presets train? The GPT-2 recipe against the default, at the CPU preset's budget.

Every run is `train.py config/pretrain_cpu.py` (4 layers x 256, blocks of 512, the rates decayed to
10%) with the recipe spelled out on the command line, so a run means the same whatever the
presets' defaults are:
  classic   learned positions, LayerNorm, GELU, tied head, biases; AdamW for everything (2e-3); cosine
  default   RoPE, RMSNorm, SwiGLU, QK-norm, untied head, no biases; Muon for the hidden
            matrices (0.02), AdamW (2e-3) for the embeddings, head and norms; cosine. Recipe v1's
            default and recipe v2's baseline: the presets now train default+wsd
  modern_adamw  the default's architecture with AdamW only: splits the gain between the two
Recipe v2's components (issue 25), each one set of flags on top of `default` (COMPONENTS below):
`--components relu2,wsd` trains default+relu2 and default+wsd beside default itself, and
`--combine relu2,wsd` one recipe with both, default+relu2+wsd.
The grid is recipes x rate scales x sequences per step x seeds, at a fixed token budget. A rate
scale multiplies the recipe's tuned rate: AdamW's learning_rate (and min_lr) for classic and
modern_adamw, muon_lr for default (x0.5, x1, x2 = 0.01, 0.02, 0.04). Sequences per step change
the tokens per step at the same budget (fewer steps). After training, each run's final
checkpoint is scored by `evaluate.py --task owt` on every 512-token window of data/owt/val.bin
(the same windows for every run).

    python bench/ablate.py                                           # classic vs default, 2 seeds
    python bench/ablate.py --recipes classic --lr-scales 0.5,2 --seeds 1337
    python bench/ablate.py --recipes default --lr-scales 0.5,2 --seeds 1337
    python bench/ablate.py --tokens 400000 --jobs 2 --recipes classic,default --batch-sizes 8
    python bench/ablate.py --components relu2,zero_init,softcap --tokens 1024000 --seeds 1337  # screen
    python bench/ablate.py --recipes default --tokens 1024000 --seeds 1338      # the screen's spread
    python bench/ablate.py --components relu2                                   # confirm: 2M, 2 seeds
    python bench/ablate.py --combine relu2,softcap                              # the winners together

Runs go to out/ablate/<name>, <name> = recipe[_lrXx][_bN][_tTOKENS]_sSEED (recipe: e.g.
default+relu2); a finished run of the same command is reused, an interrupted one resumes. The
report covers every finished run of this budget in out/ablate (so separate invocations add up):
out/bench/ablate[_tTOKENS].md, .json and .png. Each row is compared with `default` (equal tokens,
equal wall-clock, and whether the gap exceeds twice the seeds' spread) and with the GPT-2
recipe's final loss at --classic-tokens (the tokens each run took to reach it).
"""
import argparse
import collections
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import UserError, atomic_path, run_main, write_json  # noqa: E402
from provenance import git_state, machine  # noqa: E402

RECIPES = {
    "classic": ["--pos_emb=learned", "--norm=layernorm", "--mlp=gelu", "--qk_norm=false",
                "--tie_embeddings=true", "--bias=true", "--optimizer=adamw", "--lr_schedule=cosine"],
    # recipe v1's default, the baseline of recipe v2's study; the presets now train default+wsd
    "default": ["--pos_emb=rope", "--norm=rmsnorm", "--mlp=swiglu", "--qk_norm=true",
                "--tie_embeddings=false", "--bias=false", "--optimizer=muon", "--lr_schedule=cosine"],
}
RECIPES["modern_adamw"] = [f.replace("=muon", "=adamw") for f in RECIPES["default"]]
# settings that were train.py's defaults when a run's stamp was written without them: a stamp from
# before the recipes spelled out the schedule ran cosine, and means the same run as today's
IMPLIED = {"lr_schedule": "cosine"}
# recipe v2's candidates, each what modded-nanogpt's records or nanochat use instead of ours
COMPONENTS = {
    "relu2": ["--mlp=relu2"],  # ReLU^2 at 4x width instead of SwiGLU
    "zero_init": ["--zero_init_proj=true"],  # attention's and the MLP's output projections start at zero
    "softcap": ["--logit_softcap=15"],  # logits capped at +-15 (modded-nanogpt's cap)
    "qkv_split": ["--muon_split_qkv=true"],  # Muon orthogonalizes Q, K and V apart
    "muon_wd0": ["--muon_weight_decay=0"],  # no weight decay on Muon's matrices (AdamW keeps 0.1)
    "clip_adamw": ["--clip_muon=false"],  # gradient clipping on AdamW's parameters only
    "wsd": ["--lr_schedule=wsd", "--cooldown_frac=0.4"],  # warmup, flat, linear decay over the last 40%
    "polar_express": ["--muon_ns=polar_express"],  # Polar Express coefficients for Newton-Schulz
}
ADAMW_LR, MUON_LR, MUON_MOMENTUM = 2e-3, 0.02, 0.95
PRESET_TOKENS = 2_048_000  # config/pretrain_cpu.py: 1,000 steps of 4 x 512


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    names = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    p.add_argument("--recipes", type=names, help=f"comma-separated: {', '.join(RECIPES)} (default classic,default; "
                                                 f"with --components or --combine: default)")
    p.add_argument("--components", type=names, default=[],
                   help=f"each one on top of default, one recipe each: {', '.join(COMPONENTS)}")
    p.add_argument("--combine", type=names, default=[], help="these components together, as one recipe")
    p.add_argument("--classic-tokens", type=int, default=PRESET_TOKENS,
                   help="tokens-to-equal-loss aims at the GPT-2 recipe's final loss at this budget (default 2,048,000)")
    p.add_argument("--lr-scales", type=floats, default=[1.0], help="multiples of the recipe's rate (default 1)")
    p.add_argument("--batch-sizes", type=ints, default=[4], help="sequences of 512 tokens per step (default 4)")
    p.add_argument("--seeds", type=ints, default=[1337, 1338], help="default 1337,1338")
    p.add_argument("--tokens", type=int, default=PRESET_TOKENS, help="tokens per run (default 2,048,000: the preset's)")
    p.add_argument("--evals", type=int, default=10, help="evaluations during training (default 10)")
    p.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation (default 10)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--eval-windows", type=int, help="final evaluation: first N windows of val.bin (default all)")
    p.add_argument("--data-dir", default="data/owt")
    p.add_argument("--out-root", default="out/ablate")
    p.add_argument("--report-dir", default="out/bench")
    p.add_argument("--block-size", type=int, default=512, help="tokens per sequence (default 512: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another train.py override for every run (e.g. a smaller model for a quick try)")
    p.add_argument("--report-only", action="store_true", help="no training: report the finished runs")
    p.add_argument("--recorded", action="append", default=[], metavar="JSON",
                   help="also report the runs in an earlier report's .json (e.g. docs/ablate_t1024000.json): "
                        "runs whose out/ folders are gone; a finished run in --out-root wins over its record")
    args = p.parse_args(argv)
    if args.recipes is None:
        args.recipes = ["default"] if args.components or args.combine else ["classic", "default"]
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        raise UserError(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    unknown = [c for c in args.components + args.combine if c not in COMPONENTS]
    if unknown:
        raise UserError(f"unknown component(s) {unknown}; choose from {', '.join(COMPONENTS)}")
    args.recipes += [f"default+{c}" for c in args.components]
    if args.combine:
        args.recipes.append("+".join(["default", *dict.fromkeys(args.combine)]))
    args.recipes = list(dict.fromkeys(args.recipes))
    for b in args.batch_sizes:
        step = b * args.block_size
        if args.tokens % step or args.tokens // step < args.evals:
            raise UserError(f"--tokens {args.tokens:,} is not a whole number of steps of {b} x {args.block_size} "
                            f"tokens (at least --evals {args.evals}); try {step * 1000:,}")
    if min(args.lr_scales) <= 0 or args.jobs < 1:
        raise UserError("--lr-scales must be positive and --jobs at least 1")
    for split in ("train.bin", "val.bin"):
        if not args.report_only and not os.path.isfile(os.path.join(ROOT, args.data_dir, split)):
            raise UserError(f"{args.data_dir}/{split} not found; run python prepare_owt.py --source "
                            f"../shared/data/webtext --decontaminate --data-root ../shared/data")
    return args


def run_name(recipe, scale, batch, seed, tokens):
    """Only what differs from the preset shows: budgets, rates and batches never share a folder."""
    return (recipe + ("" if scale == 1 else f"_lr{scale:g}x") + ("" if batch == 4 else f"_b{batch}")
            + ("" if tokens == PRESET_TOKENS else f"_t{tokens}") + f"_s{seed}")


def flag_key(flag):
    return flag[2:].split("=")[0]


def recipe_flags(recipe):
    """train.py's flags for a recipe: a base recipe, then each of its components ("default+relu2+wsd"),
    a component's flag replacing the base's of the same key."""
    base, *components = recipe.split("+")
    extra = [flag for c in components for flag in COMPONENTS[c]]
    replaced = {flag_key(f) for f in extra}
    return [f for f in RECIPES[base] if flag_key(f) not in replaced] + extra


def run_settings(argv):
    """What a run's train.py arguments set, {key: value} (a repeated key's last value wins, as in
    train.py; a preset file is a key of its own), with IMPLIED's settings where it leaves them out."""
    settings = dict(IMPLIED)
    for arg in argv:
        key, _, value = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
        settings[key] = value
    return settings


def recipe_of(argv):
    """The recipe a run's settings ({key: value}, run_settings) train: its components are those whose
    every flag it has, its base the recipe whose other flags it has."""
    settings = {f"{k}={v}" for k, v in argv.items()}
    on = [c for c, flags in COMPONENTS.items() if all(f[2:] in settings for f in flags)]
    replaced = {flag_key(f) for c in on for f in COMPONENTS[c]}
    base = next(r for r, flags in RECIPES.items()
                if all(f[2:] in settings for f in flags if flag_key(f) not in replaced))
    return "+".join([base, *on])


def train_argv(args, recipe, scale, batch, seed, out_dir):
    """train.py's arguments for one run; the schedule keeps the preset's shape at any budget."""
    iters = args.tokens // (batch * args.block_size)
    muon = recipe.split("+")[0] == "default"
    adamw = ADAMW_LR * (1 if muon else scale)
    rates = [f"--learning_rate={adamw:g}", f"--min_lr={adamw / 10:g}"]
    if muon:
        rates += [f"--muon_lr={MUON_LR * scale:g}", f"--muon_momentum={MUON_MOMENTUM:g}"]
    return (["config/pretrain_cpu.py", "--device=cpu", "--dtype=float32", f"--num_threads={args.threads}",
             "--compile=false", f"--seed={seed}", f"--batch_size={batch}", "--gradient_accumulation_steps=1",
             f"--max_iters={iters}", f"--warmup_iters={max(1, iters // 20)}",
             f"--eval_interval={iters // args.evals}", f"--eval_iters={args.eval_iters}"]
            + ([] if args.block_size == 512 else [f"--block_size={args.block_size}"])
            + rates + recipe_flags(recipe) + [f"--{kv}" for kv in args.set]
            + [f"--data_dir={args.data_dir}", f"--out_dir={out_dir}"])


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def finished(out_dir, iters):
    evals = [r for r in read_jsonl(os.path.join(ROOT, out_dir, "metrics.jsonl")) if r["type"] == "eval"]
    return bool(evals) and evals[-1]["iter"] == iters


def run_one(args, spec):
    """Train (or resume, or reuse) one run, then score its final checkpoint on the fixed windows."""
    name, argv, iters = spec["name"], spec["argv"], spec["iters"]
    out_dir = os.path.join(args.out_root, name)
    stamp = os.path.join(ROOT, out_dir, "ablate_argv.json")
    same = os.path.exists(stamp) and run_settings(read_json(stamp)) == run_settings(argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    log_path = os.path.join(ROOT, out_dir, "train.log")
    if not (same and finished(out_dir, iters)):
        os.makedirs(os.path.join(ROOT, out_dir), exist_ok=True)
        write_json(stamp, argv)
        write_json(os.path.join(ROOT, out_dir, "ablate_run.json"), {"git": git_state(), "machine": machine()})
        flag = "--resume" if same else "--overwrite"
        print(f"[{name}] python train.py {' '.join(argv)} {flag}", flush=True)
        with open(log_path, "a") as log:
            if subprocess.run([sys.executable, "train.py", *argv, flag], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode:
                raise UserError(f"{name}: train.py failed; see {log_path}")
    final = os.path.join(ROOT, out_dir, "eval", "owt_val_metrics.json")
    ckpt = os.path.join(ROOT, out_dir, "ckpt.pt")
    if not os.path.exists(final) or os.path.getmtime(final) < os.path.getmtime(ckpt):
        cmd = ["evaluate.py", "--task", "owt", "--ckpt", ckpt, "--owt-bin", os.path.join(args.data_dir, "val.bin"),
               "--device", "cpu", "--dtype", "float32"] + (["--limit", str(args.eval_windows)] if args.eval_windows
                                                            else [])
        with open(log_path, "a") as log:
            if subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode:
                raise UserError(f"{name}: evaluate.py failed; see {log_path}")
    print(f"[{name}] final validation loss {read_json(final)['scores']['loss']:.4f}", flush=True)


def collect(args, tokens):
    """Every finished run of this budget under out_root, with its curve, final score, code and machine;
    then those recorded in --recorded files that out_root does not have."""
    runs = []
    root = os.path.join(ROOT, args.out_root)
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        stamp, final = (os.path.join(root, name, p) for p in ("ablate_argv.json", "eval/owt_val_metrics.json"))
        if not (os.path.exists(stamp) and os.path.exists(final)):
            continue
        argv = run_settings(read_json(stamp))
        batch, iters = int(argv["batch_size"]), int(argv["max_iters"])
        if batch * args.block_size * iters != tokens or not finished(os.path.join(args.out_root, name), iters):
            continue
        records = read_jsonl(os.path.join(root, name, "metrics.jsonl"))
        origin = os.path.join(root, name, "ablate_run.json")  # absent for runs started before it was written
        origin = read_json(origin) if os.path.exists(origin) else {}
        recipe = recipe_of(argv)
        optimizer_lr = float(argv["muon_lr"]) if argv["optimizer"] == "muon" else float(argv["learning_rate"])
        train_rows = [r for r in records if r["type"] == "train"]
        train_rows = train_rows[1:] or train_rows  # the first logged rows hold the warm-up
        runs.append({"name": name, "recipe": recipe, "seed": int(argv["seed"]), "batch_size": batch,
                     "optimizer": argv["optimizer"], "lr": optimizer_lr, "steps": iters,
                     "final_loss": read_json(final)["scores"]["loss"],
                     "curve": [(r["iter"] * batch * args.block_size, r["time"] / 60, r["val_loss"])
                               for r in records if r["type"] == "eval"],
                     "minutes": records[-1]["time"] / 60,
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_rows),
                     "commit": (origin.get("git") or {}).get("commit"), "machine": origin.get("machine")})
    return runs + recorded_runs(args.recorded, tokens, {r["name"] for r in runs})


def recorded_runs(paths, tokens, have):
    """The runs of this budget in earlier reports' .json files, less those named in have."""
    out = []
    for path in paths:
        try:
            with open(os.path.join(ROOT, path) if not os.path.isabs(path) else path) as f:
                recorded = json.load(f)["runs"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--recorded {path}: not an ablate report's .json ({e.__class__.__name__}: {e}); "
                            "pass the .json that bench/ablate.py wrote")
        for run in recorded:
            if run["curve"][-1][0] == tokens and run["name"] not in have:
                have.add(run["name"])
                out.append({**run, "curve": [tuple(point) for point in run["curve"]], "recorded": path})
    return out


def loss_at_minutes(curve, minutes):
    """The evaluation curve's loss at a wall-clock time, by linear interpolation; None past its end."""
    for (_, t0, l0), (_, t1, l1) in zip(curve, curve[1:]):
        if t0 <= minutes <= t1:
            return l0 + (l1 - l0) * (minutes - t0) / (t1 - t0)
    return None


def tokens_to_reach(curve, target):
    """Tokens at which the evaluation curve first reaches target (linear between evaluations); None if never."""
    for (n0, _, l0), (n1, _, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return n0 + (n1 - n0) * max(0.0, (l0 - target) / (l0 - l1))
    return None


def summarize(runs):
    """One row per (recipe, optimizer rate, sequences per step): mean and spread over seeds."""
    groups = {}
    for r in runs:
        groups.setdefault((r["recipe"], r["lr"], r["batch_size"]), []).append(r)
    rows = []
    for (recipe, lr, batch), rs in sorted(groups.items()):
        finals = [r["final_loss"] for r in rs]
        rows.append({"recipe": recipe, "optimizer": rs[0]["optimizer"], "lr": lr, "batch_size": batch,
                     "seeds": [r["seed"] for r in rs], "finals": finals, "mean": statistics.mean(finals),
                     "spread": max(finals) - min(finals), "minutes": statistics.median(r["minutes"] for r in rs),
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs)})
    return rows


def compare(rows, runs, target):
    """Each row set against default's (vs_default: None for default itself) and, with a target, the
    mean tokens its runs took to reach the GPT-2 recipe's loss (to_target; None if one never did)."""
    for row in rows:
        row["vs_default"] = against_default(row, rows, runs)
        reached = [tokens_to_reach(r["curve"], target["loss"]) for r in row_runs(row, runs).values()] if target else []
        row["to_target"] = statistics.mean(reached) if reached and None not in reached else None
    return rows


def markdown(args, runs, rows, target=None):
    """The table (one row per configuration, each set against `default`'s row and, with target, the
    tokens it took to reach the GPT-2 recipe's final loss) and the classic-vs-default lines."""
    aim = f"tokens to {target['loss']:.3f}" if target else "tokens to GPT-2's loss"
    out = [f"# Recipe ablation, {args.tokens:,} tokens per run, CPU preset shape\n",
           f"Final validation loss: every {args.block_size}-token window of {args.data_dir}/val.bin "
           "(the same windows for every run). Against default: the gap in final loss (paired by seed), the gap "
           "in in-training loss when the faster of each pair finished, and whether the final gap exceeds twice "
           "the seeds' spread (the larger of the two rows'). " + (
               f"{aim}: where the in-training loss first reached the GPT-2 recipe's final in-training loss at "
               f"{target['tokens']:,} tokens ({target['recipe']}, mean of {target['seeds']} seed(s)), and the share "
               f"of those tokens.\n" if target else
               f"No GPT-2 recipe run of {args.classic_tokens:,} tokens yet: no tokens-to-equal-loss.\n"),
           "| recipe | optimizer (rate) | tokens/step | seeds | final val loss, mean | per seed | minutes | tok/s "
           f"| vs default | vs default, equal time | verdict | {aim} |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap, reached = r["vs_default"], r["to_target"]
        versus = ("— | — | —" if gap is None else
                  f"{gap['final']:+.3f} | " + ("—" if gap["equal_time"] is None else f"{gap['equal_time']:+.3f}")
                  + f" | {gap['verdict']}")
        out.append(f"| {r['recipe']} | {r['optimizer']} ({r['lr']:g}) | {r['batch_size'] * args.block_size:,} | "
                   f"{len(r['seeds'])} | {r['mean']:.3f} | {', '.join(f'{x:.3f}' for x in r['finals'])} | "
                   f"{r['minutes']:.0f} | {r['tokens_per_s']:.0f} | {versus} | "
                   + ("—" if not target else "never" if reached is None else
                      f"{reached:,.0f} ({reached / target['tokens']:.0%})") + " |")
    out += provenance_lines(runs) + classic_against_default(args, runs, rows) + next_step(args, rows)
    return "\n".join(out) + "\n"


def provenance_lines(runs):
    """Which code and machines trained the runs, and which came from recorded reports."""
    def counted(values):
        return "; ".join(f"{'unrecorded' if v is None else v} ({n})" for v, n in collections.Counter(values).items())
    out = [f"\nRuns per code commit: {counted((r.get('commit') or '')[:7] or None for r in runs)}. "
           f"Per machine: {counted(r.get('machine') for r in runs)}."]
    recorded = [r for r in runs if r.get("recorded")]
    if recorded:
        out.append(f"From recorded reports (their out/ folders absent here): {counted(r['recorded'] for r in recorded)}.")
    return out


def row_runs(row, runs):
    """{seed: run} of a row's configuration."""
    return {r["seed"]: r for r in runs
            if (r["recipe"], r["lr"], r["batch_size"]) == (row["recipe"], row["lr"], row["batch_size"])}


def reference(row, rows):
    """The default row a row is set against: same rate and sequences per step, else the best default
    of those sequences per step; None for the default row itself or without one."""
    defaults = [d for d in rows if d["recipe"] == "default" and d["batch_size"] == row["batch_size"]]
    same = [d for d in defaults if d["lr"] == row["lr"]]
    ref = same[0] if same else min(defaults, key=lambda d: d["mean"], default=None)
    return None if ref is None or ref is row else ref


def against_default(row, rows, runs):
    """{final, equal_time, verdict} of a row against its default row: the gaps in final loss (mean over
    shared seeds, else of the means) and in in-training loss when the faster of each pair finished, and
    whether the final gap exceeds twice the seeds' spread; None for the default row."""
    ref = reference(row, rows)
    if ref is None:
        return None
    mine, theirs = row_runs(row, runs), row_runs(ref, runs)
    seeds = sorted(set(mine) & set(theirs))
    final = (statistics.mean(mine[s]["final_loss"] - theirs[s]["final_loss"] for s in seeds) if seeds
             else row["mean"] - ref["mean"])
    at_time = []
    for s in seeds:
        t = min(mine[s]["minutes"], theirs[s]["minutes"])
        a, b = loss_at_minutes(mine[s]["curve"], t), loss_at_minutes(theirs[s]["curve"], t)
        if a is not None and b is not None:
            at_time.append(a - b)
    spreads = [r["spread"] for r in (row, ref) if len(r["seeds"]) > 1]
    if not spreads:
        verdict = "one seed each: no spread"
    else:
        bar = 2 * max(spreads)
        verdict = (f"better (> {bar:.3f})" if -final > bar else f"worse (> {bar:.3f})" if final > bar
                   else f"within {bar:.3f}")
    return {"final": final, "equal_time": statistics.mean(at_time) if at_time else None, "verdict": verdict}


def classic_target(runs):
    """The GPT-2 recipe's final in-training loss in runs (of --classic-tokens), which tokens-to-equal-loss
    aims at: its best configuration there, mean over seeds; None without such a run."""
    classic = [r for r in runs if r["recipe"] == "classic"]
    if not classic:
        return None
    best = min(summarize(classic), key=lambda r: r["mean"])
    curves = [r["curve"] for r in row_runs(best, classic).values()]
    return {"loss": statistics.mean(c[-1][2] for c in curves), "tokens": curves[0][-1][0],
            "recipe": f"classic, {best['optimizer']} {best['lr']:g}", "seeds": len(curves)}


def classic_against_default(args, runs, rows):
    """The lines under the table: the best default against the best GPT-2 recipe, per seed."""
    out = []
    best = {rec: min((r for r in rows if r["recipe"] == rec), key=lambda r: r["mean"])
            for rec in dict.fromkeys(r["recipe"] for r in rows)}
    if "classic" in best and "default" in best:
        c, d = best["classic"], best["default"]
        out.append(f"\nBest default ({d['optimizer']} {d['lr']:g}) minus best classic ({c['optimizer']} "
                   f"{c['lr']:g}), equal tokens: {d['mean'] - c['mean']:+.3f} nats.")
        pairs = [(a, b) for a in runs for b in runs if a["seed"] == b["seed"] and a["batch_size"] == b["batch_size"]
                 and (a["recipe"], a["lr"]) == ("classic", c["lr"]) and (b["recipe"], b["lr"]) == ("default", d["lr"])]
        for a, b in pairs:  # equal wall-clock: where each was when the faster one finished
            t = min(a["minutes"], b["minutes"])
            la, lb = loss_at_minutes(a["curve"], t), loss_at_minutes(b["curve"], t)
            if la is not None and lb is not None:
                out.append(f"Equal wall-clock, seed {a['seed']}: after {t:.0f} min, classic {la:.3f} vs default "
                           f"{lb:.3f} ({lb - la:+.3f}; in-training evaluation, {args.eval_iters} batches).")
            reached = tokens_to_reach(b["curve"], a["curve"][-1][2])
            out.append(f"Equal loss, seed {a['seed']}: default reaches classic's final in-training loss "
                       f"({a['curve'][-1][2]:.3f}) " + ("never" if reached is None else
                                                         f"after {reached:,.0f} tokens, "
                                                         f"{reached / a['curve'][-1][0]:.0%} of classic's") + ".")
    return out


def next_step(args, rows):
    """The protocol's next command: the components that beat default beyond twice the seeds' spread go
    from screening on to confirmation at the preset's budget, and from confirmation into one combination."""
    winners = [r["recipe"].split("+")[1] for r in rows if r["recipe"].count("+") == 1
               and r["vs_default"] and r["vs_default"]["verdict"].startswith("better")]
    if not winners:
        return []
    flag = "--combine" if args.tokens == PRESET_TOKENS else "--components"
    return [f"\nBeyond twice the spread at this budget: {', '.join(winners)}. Next: "
            f"`python bench/ablate.py {flag} {','.join(winners)}`."]


def plot(runs, path, target=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    styles = {}
    for r in sorted(runs, key=lambda r: (r["recipe"], r["lr"], r["batch_size"], r["seed"])):
        key = f"{r['recipe']} {r['optimizer']} {r['lr']:g}" + ("" if r["batch_size"] == 4 else f" b{r['batch_size']}")
        label = None if key in styles else key  # one legend entry per configuration, not per seed
        n = len(styles)  # past ten configurations the colours repeat with another line style
        style = styles.setdefault(key, {"color": f"C{n % 10}", "linestyle": ("-", "--", ":")[n // 10 % 3]})
        tokens, minutes, loss = zip(*r["curve"][1:])
        axes[0].plot([t / 1e6 for t in tokens], loss, label=label, alpha=0.8, **style)
        axes[1].plot(minutes, loss, alpha=0.8, **style)
    if target:
        for ax in axes:
            ax.axhline(target["loss"], color="grey", linewidth=0.8, linestyle="-.",
                       label=f"GPT-2 recipe at {target['tokens'] / 1e6:g}M tokens" if ax is axes[0] else None)
    axes[0].set(xlabel="tokens (M)", ylabel="validation loss (in-training, 10 batches)")
    axes[1].set(xlabel="wall-clock minutes (1 thread, 2 runs sharing 2 cores)")
    axes[0].legend(fontsize=8, ncol=1 + (len(styles) > 8))
    top = max(l for r in runs for _, _, l in r["curve"][1:3])
    bottom = min(l for r in runs for _, _, l in r["curve"]) - 0.1
    axes[0].set_ylim(bottom, max(min(top, 8.0), bottom + 0.5))  # a tiny model's curves lie above 8 entirely
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")


def main(argv=None):
    args = parse_args(argv)
    specs = []
    for seed in args.seeds:
        for rec in args.recipes:
            for s in args.lr_scales:
                for b in args.batch_sizes:
                    name = run_name(rec, s, b, seed, args.tokens)
                    specs.append({"name": name, "iters": args.tokens // (b * args.block_size),
                                  "argv": train_argv(args, rec, s, b, seed, os.path.join(args.out_root, name))})
    recorded = {r["name"] for r in recorded_runs(args.recorded, args.tokens, set())}  # finished elsewhere
    if not args.report_only:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(run_one, args, spec) for spec in specs if spec["name"] not in recorded]:
                future.result()
    runs = collect(args, args.tokens)
    if not runs:
        raise UserError(f"no finished run of {args.tokens:,} tokens in {args.out_root}")
    target = classic_target(runs if args.classic_tokens == args.tokens else collect(args, args.classic_tokens))
    rows = compare(summarize(runs), runs, target)
    md = markdown(args, runs, rows, target)
    print("\n" + md, flush=True)
    report = os.path.join(ROOT, args.report_dir)
    os.makedirs(report, exist_ok=True)
    stem = "ablate" + ("" if args.tokens == PRESET_TOKENS else f"_t{args.tokens}")  # a budget's report its own
    with atomic_path(os.path.join(report, f"{stem}.md")) as tmp, open(tmp, "w") as f:
        f.write(md)
    write_json(os.path.join(report, f"{stem}.json"), {"tokens": args.tokens, "target": target, "runs": runs,
                                                       "rows": rows})
    plot(runs, os.path.join(report, f"{stem}.png"), target)
    print(f"wrote {args.report_dir}/{stem}.md, {stem}.json, {stem}.png")
    return rows


if __name__ == "__main__":
    run_main(main)
