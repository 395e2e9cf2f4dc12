"""Write a run's project report: out/<run>/REPORT.md with its loss curves beside it.

    python report.py out/cpu                  # after pipeline.py (or the steps by hand)
    python report.py out/cpu --samples 5

Reads only what the other steps left in the run folder (pretrain/, finetune/, eval/, pipeline/);
anything missing is reported as "not run". Sections: model card, training record, loss curves,
scores beside trivial baselines and published anchors, sample outputs, commands and configs.
"""
import argparse
import contextlib
import json
import os
import shlex
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import tasks  # noqa: E402
from common import UserError, atomic_path, human, run_main  # noqa: E402
from datacard import data_section, markdown_table as table  # noqa: E402
from metrics import confidence_intervals  # noqa: E402
from provenance import machine, provenance_line, relative, user_command  # noqa: E402

FEW_EXAMPLES = 200  # below this, a score's interval is too wide to compare runs by

def read_json(path):
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); rerun the step that writes it") from None


def read_metrics(path):
    """metrics.jsonl as (train lines, eval lines, plan lines); a half-written last line is skipped."""
    if not os.path.isfile(path):
        return [], [], []
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.rstrip().endswith("}")]
    return tuple([r for r in lines if r.get("type") == kind] for kind in ("train", "eval", "plan"))


def summarize_checkpoint(path):
    """Configs, counters and parameter counts of a checkpoint; its weights are not kept."""
    if not os.path.isfile(path):
        return None
    import torch
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__})") from None
    mc = ckpt["model_config"]
    shapes = {k: v.numel() for k, v in ckpt["model"].items()}
    info = {k: ckpt.get(k) for k in ("model_config", "config", "iter_num", "best_val_loss", "val_loss",
                                     "val_losses", "tasks_version", "tasks", "realised_mix", "selection")}
    del ckpt
    if mc.get("tie_embeddings", True):
        shapes.pop("lm_head.weight", None)  # the same tensor as wte.weight
    embed = {"token table": shapes.get("wte.weight", 0), "position table": shapes.get("wpe.weight", 0),
             "untied output head": shapes.get("lm_head.weight", 0)}
    info["params"] = {"total": sum(shapes.values()), **embed,
                      "non-embedding": sum(shapes.values()) - sum(embed.values())}
    return info


def wall_seconds(lines):
    """Training time from the logs; a resumed run restarts its clock, so add up each segment.
    Within one iteration the clock still runs: an eval line before its step's train line is not
    a new segment."""
    total, last = 0.0, 0.0
    for r in sorted(lines, key=lambda r: (r["iter"], r["time"])):
        if r["time"] < last:
            total += last
        last = r["time"]
    return total + last


def tokens_per_step(cfg):
    return cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]


def model_card(ckpt):
    if ckpt is None:
        return "## Model\n\nNo checkpoint found (pretraining and finetuning not run).\n"
    mc, p = ckpt["model_config"], ckpt["params"]
    rows = [("layers", mc["n_layer"]), ("attention heads", mc["n_head"]),
            ("width (n_embd)", f"{mc['n_embd']} (head size {mc['n_embd'] // mc['n_head']})"),
            ("context length", f"{mc['block_size']} tokens"),
            ("positions", "rotary (RoPE, base %g)" % mc["rope_base"] if mc["pos_emb"] == "rope" else "learned"),
            ("normalization", f"{mc['norm']} (pre-norm)" + (", QK-norm" if mc.get("qk_norm") else "")),
            ("MLP", mc["mlp"]), ("biases", "yes" if mc["bias"] else "no"),
            ("embeddings", "tied (input = output)" if mc["tie_embeddings"] else "untied"),
            ("dropout", mc["dropout"])]
    rows += [(f"parameters: {k}", f"{v:,} ({human(v)})") for k, v in p.items() if v]
    rows.append(("tokenizer", f"GPT-2 BPE (tiktoken `gpt2`), 50,257 tokens padded to {mc['vocab_size']:,}"))
    return ("## Model\n\nA decoder-only Transformer (model.py). Non-embedding parameters exclude the token and "
            "position tables and an untied output head (Kaplan et al. 2020).\n\n" + table(("", ""), rows))


def plan_rows(plans, train):
    """The run's plan as it started (trainer.py logs it), its time budget and the peak memory seen."""
    start = next((p for p in plans if "params" in p), None)
    budget = next((p for p in plans if "budget_hours" in p), None)
    peaks = [r["peak_mem_mib"] for r in train if r.get("peak_mem_mib")]
    rows = [("plan at the start", f"{human(start['tokens'])} tokens, {start['train_flops']:.2e} training FLOPs; "
                                  f"micro-batch {start['micro_batch']} x {start['accumulation']} accumulated over "
                                  f"{start['processes']} process(es) (by {start['batch_chosen_by']}); checkpoints "
                                  f"{start['ckpt_bytes'] / 1e9:.2f} GB")] if start else []
    if budget:
        rows.append(("time budget", f"{budget['budget_hours']:g} h: {budget['step_s']:.3g} s per step measured "
                                    f"-> {budget['max_iters']:,} steps"))
    return rows + ([("peak memory", f"{max(peaks) / 1024:.1f} GiB")] if peaks else [])


def training_record(name, ckpt, train, evals, plans=(), finetune=False):
    out = f"### {name}\n\n"
    if ckpt is None and not train:
        return out + "Not run.\n"
    cfg = (ckpt or {}).get("config") or {}
    steps = max([r["iter"] for r in train + evals] or [0])
    rows = [("optimizer steps", f"{steps:,}" + (f" of {cfg['max_iters']:,} planned" if cfg else ""))]
    if cfg:
        per_step = tokens_per_step(cfg)
        rows += [("tokens seen", f"{human(steps * per_step)} ({per_step:,} positions per step = batch "
                                 f"{cfg['batch_size']} x block {cfg['block_size']} x accumulation "
                                 f"{cfg['gradient_accumulation_steps']})"),
                 ("optimizer", cfg["optimizer"] + (f" (lr {cfg['muon_lr']}) + AdamW" if cfg["optimizer"] == "muon"
                                                   else "") + f", peak lr {cfg['learning_rate']}, warmup "
                               f"{cfg['warmup_iters']} steps, cosine decay to {cfg['min_lr']}")]
        if finetune:
            weights = cfg["task_weights"] or f"proportional to size, capped at {cfg['mix_cap']:,} examples"
            rows.insert(0, ("task mix", f"{cfg['tasks']}; weights: {weights}; replay {cfg['replay_fraction']:.0%} "
                                        "pretraining text; loss on targets only"))
    else:
        rows.append(("config", "unknown (no checkpoint)"))
    rows += plan_rows(plans, train)
    rows += [("hardware", f"{machine()} (report machine: the logs do not record it; config device="
                          f"{cfg.get('device', '?')})")]
    if train:
        rows += [("median throughput", f"{statistics.median(r['tokens_per_s'] for r in train):,.0f} tokens/s, "
                                       f"MFU {100 * statistics.median(r['mfu'] for r in train):.1f}%"),
                 ("final train loss", f"{train[-1]['loss']:.4f}")]
    selection = (ckpt or {}).get("selection") if finetune else None
    if selection:
        rows.append(("model.pt chosen on", selection_line(selection)))
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        rows.append((f"best {'selection' if selection else 'val'} loss",
                     f"{best['val_loss']:.4f} (iter {best['iter']})"))
    out += table(("", ""), rows)
    if finetune and evals:
        first, last = evals[0], evals[-1]
        names = [k[4:] for k in first if k.startswith("val/")]
        best = (ckpt or {}).get("val_losses") or {}
        out += (f"\nPer-task {'selection' if selection else 'validation'} loss (target tokens only), "
                f"iter {first['iter']} -> {last['iter']}"
                + (f"; model.pt is the best mean (iter {ckpt['iter_num']})" if best else "") + ":\n\n"
                + table(("task", "start", "end") + (("model.pt",) if best else ()),
                        [(t, fmt(first["val/" + t], 4), fmt(last.get("val/" + t), 4))
                         + ((fmt(best.get(t), 4),) if best else ()) for t in names]))
    return out


def selection_line(selection):
    """What finetuning chose model.pt on (prepare_finetune.py's record of each task's selection slice)."""
    s = next(iter(selection.values()))
    return (f"`{s['split']}`, held out of each task's train split and never trained on (" + ", ".join(
        f"{task} {v['examples']:,}" for task, v in selection.items()) + f" examples): {s['rule']}; no text of a "
        f"reported split ({', '.join(sorted({x for v in selection.values() for x in v['reported_splits']}))})")


def plot_curves(path, title, cfg, train, evals, per_task=False, held_out="val"):
    """Train loss (raw, light; smoothed) and validation (per_task: held_out) loss against tokens seen."""
    scale = tokens_per_step(cfg) if cfg else 1
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        xs, ys = [r["iter"] * scale for r in train], [r["loss"] for r in train]
        half = len(ys) // 40  # a centered moving average over ~5% of the run: no lag
        smooth = [statistics.fmean(ys[max(0, i - half):i + half + 1]) for i in range(len(ys))]
        ax.plot(xs, ys, color="gray", alpha=0.35, lw=0.8)
        ax.plot(xs, smooth, color="black", label="train" + (" (smoothed)" if half else ""))
    keys = [k for k in (evals[0] if evals else {}) if k.startswith("val/")] if per_task else ["val_loss"]
    for k in keys:
        pts = [(r["iter"] * scale, r[k]) for r in evals if k in r]
        ax.plot(*zip(*pts), marker="o", ms=3, label=k.replace("val/", held_out + " ") if per_task else "validation")
    ax.set_xlabel(("tokens seen" + (" (positions, incl. padding)" if per_task else "")) if cfg else "iteration")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def curves(run, runs):
    out = "## Loss curves\n\n"
    for name, (ckpt, train, evals, _) in runs.items():
        if not train and not evals:
            out += f"{name}: not run.\n\n"
            continue
        file = f"{name}_loss.png"
        plot_curves(os.path.join(run, file), f"{name.capitalize()} loss", (ckpt or {}).get("config"), train, evals,
                    per_task=name == "finetune", held_out="select" if (ckpt or {}).get("selection") else "val")
        out += f"![{name} loss]({file})\n\n"
    return out


def fmt(v, digits=2):
    """A number with `digits` decimals; text (already formatted) as it is; "-" for nothing."""
    if isinstance(v, str):
        return v
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"


def read_evaluations(run):
    """{folder: {task: metrics}} of every eval*/ folder in the run: eval/ holds the finetuned model's
    scores, eval_pretrained_<K>shot/ the pretrained model's (pipeline.py)."""
    out = {}
    for folder in sorted(d for d in os.listdir(run) if d.startswith("eval") and os.path.isdir(os.path.join(run, d))):
        files = sorted(f for f in os.listdir(os.path.join(run, folder)) if f.endswith("_metrics.json"))
        found = {f.removesuffix("_metrics.json"): read_json(os.path.join(run, folder, f)) for f in files}
        out[folder] = {m["task"] if m["task"] in tasks.TASKS else stem: m for stem, m in found.items()}
    return out


def system_name(m):
    """A score row's name: which model, and how it was prompted (the metrics' shots record). A
    few-shot row says how many demonstrations fit; one where none fit is called zero-shot."""
    model = "pretrained model" if m.get("checkpoint_tasks_version") is None else "finetuned model"
    shots = m.get("shots") or {}
    if shots.get("requested") is None:
        return f"**{model}**"
    if shots["requested"] == 0:
        return f"{model}, zero-shot ({shots['format']})"
    if shots.get("used_max") == 0:
        return f"{model}, zero-shot: 0 of {shots['requested']} demonstrations fit ({shots['format']})"
    fit = f"{shots['used_mean']:.2f} fit on average" + (f", {shots['used_min']}-{shots['used_max']}"
                                                        if "used_min" in shots else "")
    return f"{model}, {shots['requested']}-shot requested ({fit})"


def protocol(m):
    """How a row's outputs were made: the decoding, its length cap, and how prompts were cut."""
    dec, prompts = m.get("decoding") or {}, m.get("prompts")
    strategy, cap = dec.get("strategy", "?"), f"up to {dec.get('max_new_tokens')} tokens"
    text = {"label_likelihood": "likelier label word",
            "greedy": f"greedy, {cap}",
            "constrained_span": f"greedy span of the passage, {cap}",
            "beam": f"beam {dec.get('num_beams')}, length penalty {dec.get('length_penalty')}, "
                    f"no repeated {dec.get('no_repeat_ngram_size')}-grams, {cap}",
            "sampling": f"top-k={dec.get('top_k')} sampling (seed {dec.get('seed')}), {cap}, first "
                        f"{dec.get('keep_sentences')} sentences kept"}.get(strategy, strategy)
    if prompts:
        cut = f"{prompts['inputs_cut']:,} of {m['count']:,}" if prompts["inputs_cut"] else "none"
        text += (f"; inputs cut to fit {prompts['block_size']} tokens less {prompts['target_room']} for the "
                 f"answer ({cut} cut)")
    return text


def sample_line(task, m):
    """Which examples were scored: the whole split or a seeded sample, and how it was drawn."""
    s, what = m.get("sample"), f"{m.get('split', 'validation')} {task.example_unit}s"
    source = relative(m.get("data_source", "?"))
    if not s:
        return f"{m['count']:,} {what} from {source} (no sample record: the first rows, if --limit was given)"
    if s["method"] == "whole split":
        return f"all {s['rows']:,} {what} of {source}"
    strata = (f", stratified by {s['stratified_by']} ({s['strata_sampled']} of {s['strata']} strata drawn from)"
              if s.get("stratified_by") else "")
    return (f"{s['rows']:,} of the {s['of']:,} {what} of {source}: a seeded random sample (seed {s['seed']})"
            f"{strata}, ids blake2b `{s['ids_blake2b']}`")


def with_interval(value, interval):
    return fmt(value) + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def intervals(task, m, eval_dir):
    """95% bootstrap intervals of the task's scores from its predictions file (when it is whole),
    and what they resample: the task's clusters where every prediction names one (SQuAD's
    articles), else its examples. ({}, None) without a whole predictions file."""
    path = os.path.join(eval_dir, f"{task.name}_{m['split']}_predictions.jsonl")
    with open(path) if os.path.isfile(path) else contextlib.nullcontext([]) as f:
        preds = [json.loads(line) for line in f if line.strip()]
    kind = next((k for k, cls in (("summarization", tasks.Summarization), ("extractive_qa", tasks.ExtractiveQA),
                                  ("classification", tasks.Classification)) if isinstance(task, cls)), None)
    if not preds or len(preds) != m["count"] or kind is None:
        return {}, None
    clusters = [p.get(task.cluster_field) for p in preds] if task.cluster_field else None
    if clusters is not None and None in clusters:
        clusters = None  # an older predictions file, without the field
    unit = (f"{len(set(clusters))} clusters of {task.example_unit}s sharing a {task.cluster_field}" if clusters
            else f"{len(preds)} {task.example_unit}s, one by one")
    cis = confidence_intervals(kind, [p["prediction"] for p in preds], [p["references"] for p in preds],
                               clusters=clusters)
    return cis, unit


def scores(evaluations, run):
    evals = evaluations.get("eval") or next(iter(evaluations.values()))
    out = ("## Evaluation\n\nEach task names its split (by default CNN/DM test, SQuAD and SST-2 validation) and "
           "which examples were scored: the whole split, or a seeded random sample stratified by SQuAD article "
           "and CNN/DM source (evaluate.py --limit). The pretrained model is scored zero- and few-shot beside the "
           "finetuned one: what pretraining alone gives, and what finetuning adds; the protocol column says how "
           "each row's outputs were made. Trivial baselines are scored by the same code (metrics.py). "
           "Published anchors are from other models, data splits and sometimes test sets: context, not a "
           "like-for-like comparison; their names give their protocol. Our CNN/DM validation set is CNN-only (no "
           "Daily Mail), where Lead-3 scores lower than on the full CNN+DM test set. Papers' ROUGE-L (pyrouge) is "
           "summary-level, i.e. the rougeLsum column. In brackets: a 95% percentile bootstrap interval (1,000 "
           "resamples; BLEU recomputed on each); under each table, the unit it resamples: SQuAD's questions are "
           "resampled by article, all of an article's questions together, as they share passages and topic.\n")
    for task in tasks.TASKS.values():
        m, cols = evals.get(task.name), task.report_metrics
        out += f"\n### {task.name}\n\n"
        if m is None:
            out += "Not run (no eval metrics file).\n"
            continue
        out += (f"{sample_line(task, m)}; checkpoint sha256 `{m.get('checkpoint', {}).get('sha256', '?')}` "
                f"on {m.get('device', '?')}, {m.get('wall_time_s', 0):.0f} s.\n\n")
        if m["count"] < FEW_EXAMPLES:
            out += (f"**Warning: only {m['count']:,} examples (under {FEW_EXAMPLES}): the scores are rough; "
                    f"evaluate more examples (a larger --limit, or none) before comparing runs.**\n\n")
        rows, units = [], []
        digest = (m.get("sample") or {}).get("ids_blake2b")
        for folder, e in evaluations.items():
            if task.name in e:
                r = e[task.name]
                ci, unit = intervals(task, r, os.path.join(run, folder))
                other = (f" [{r['split']}]" if r["split"] != m["split"] else
                         f" [another sample: {r['count']:,}]" if (r.get("sample") or {}).get("ids_blake2b") != digest
                         else "")
                rows.append((system_name(r) + other, protocol(r),
                             {c: with_interval(r["scores"].get(c), ci.get(c)) for c in cols}))
                if unit:
                    units.append(f"{unit} ({system_name(r)})")
        if m.get("baseline"):
            rows.append((f"baseline: {m['baseline']['name']}", "rule, no model", m["baseline"]["scores"]))
        rows += [(name, "as published", s) for name, s in task.anchors]
        out += table(("system", "protocol", *cols), [(name, how, *(fmt(s.get(c)) for c in cols))
                                                     for name, how, s in rows])
        if units:
            out += "\nIntervals resample " + "; ".join(units) + ".\n"
    for task, m in evals.items():
        if task.startswith("owt"):
            s = m["scores"]
            sample = m.get("sample") or {}
            how = sample.get("method", "") + (f", seed {sample['seed']}" if sample.get("seed") is not None else "")
            out += (f"\n### web text ({task})\n\nloss {s['loss']:.4f}, perplexity {s['perplexity']:.1f} over "
                    f"{s['tokens']:,} held-out tokens ({m.get('data_source', '?')}" + (f"; {how}" if how else "") + ").\n")
    return out


def clip(text, n=300):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def samples(eval_dir, evals, n):
    out = "## Sample outputs\n\nThe first examples of each prediction file, unpicked.\n"
    if not os.path.isdir(eval_dir):
        return out + "\nNot run.\n"
    for task in tasks.TASKS:
        split = (evals.get(task) or {}).get("split")
        path = os.path.join(eval_dir, f"{task}_{split}_predictions.jsonl")
        out += f"\n### {task}" + (f" ({split})" if split else "") + "\n\n"
        if not os.path.isfile(path):
            out += "Not run.\n"
            continue
        with open(path) as f:
            preds = [json.loads(line) for _, line in zip(range(n), f)]
        for p in preds:
            source = f"prompt: {clip(p['prompt'])}" if p.get("prompt") else f"id `{p['id']}`"
            out += (f"- {source}\n  - reference: {clip((p.get('references') or ['-'])[0])}\n"
                    f"  - prediction: {clip(p['prediction']) or '(empty)'}\n")
    return out


def commands(timings, configs):
    out = "## Commands and configs\n\nAs typed from the folder the run was made in.\n\n"
    if timings:
        out += f"`{shlex.join(user_command(['python', 'pipeline.py', *timings.get('argv', [])]))}` ran these steps:\n\n"
        for name, s in timings["steps"].items():
            state = " (skipped, up to date)" if s.get("skipped") else ""
            out += f"- **{name}**{state}: `{shlex.join(user_command(s['command']))}`\n"
    else:
        out += "Run by hand (no pipeline/timings.json); the configs below are those saved in the checkpoints.\n"
    for name, cfg in configs.items():
        if not cfg:
            continue
        script = "train.py" if name == "pretrain" else "finetune.py"
        lines, line = [], f"python {script}"
        for arg in (shlex.quote(a) for a in user_command(["python"] + [f"--{k}={v}" for k, v in cfg.items()])[1:]):
            if len(line) + len(arg) > 96:
                lines.append(line + " \\")
                line = "   "
            line += " " + arg
        out += (f"\n{name} config (every field saved in its checkpoint, as an equivalent command line):\n\n"
                "```bash\n" + "\n".join(lines + [line]) + "\n```\n")
    return out


def step_times(timings, runs, evals):
    """One wall-time figure per step. Training steps: the metrics log, adding up the segments of
    a resumed run (the pipeline's clock sees only the last segment); other steps: the pipeline's."""
    pipeline = (timings or {}).get("steps") or {}
    rows = []
    for step in pipeline or ("pretrain", "finetune", "evaluate"):
        logged = runs.get(step)
        if logged and (logged[1] or logged[2]):
            rows.append((step, duration(wall_seconds(logged[1] + logged[2])), "training loop, metrics log"))
        elif step in pipeline:
            rows.append((step, duration(pipeline[step]["seconds"]), "pipeline" + (
                " (by the run that made the outputs)" if pipeline[step].get("skipped") else "")))
        elif step == "evaluate" and evals:
            rows.append((step, duration(sum(m.get("wall_time_s", 0) for m in evals.values())),
                         "the metrics files' wall_time_s"))
    return "## Time per step\n\n" + (table(("step", "wall time", "measured by"), rows) if rows else "Not recorded.\n")


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder, e.g. out/cpu")
    p.add_argument("--samples", type=int, default=3, help="sample outputs per task")
    args = p.parse_args(argv)
    run = args.run
    if not os.path.isdir(run):
        raise UserError(f"run folder {run} not found; give the out/<run> folder that pipeline.py wrote")
    if not any(os.path.isdir(os.path.join(run, d)) for d in ("pretrain", "finetune", "eval")):
        raise UserError(f"{run} has no pretrain/, finetune/ or eval/ folder: not a run folder")
    pre = summarize_checkpoint(os.path.join(run, "pretrain", "ckpt.pt"))
    ft = summarize_checkpoint(os.path.join(run, "finetune", "model.pt"))
    runs = {"pretrain": (pre, *read_metrics(os.path.join(run, "pretrain", "metrics.jsonl"))),
            "finetune": (ft, *read_metrics(os.path.join(run, "finetune", "metrics.jsonl")))}
    evaluations = {k: v for k, v in read_evaluations(run).items() if v}
    timings = read_json(os.path.join(run, "pipeline", "timings.json"))
    configs = {"pretrain": (pre or {}).get("config"), "finetune": (ft or {}).get("config")}
    parts = [f"# Report: {os.path.basename(os.path.abspath(run))}\n\nA GPT pretrained on web text, then finetuned "
             "on CNN/DailyMail summarization, SQuAD v1.1 question answering and SST-2 sentiment. "
             + provenance_line(timings), model_card(ft or pre),
             data_section(configs["pretrain"], ft),
             "## Training\n", training_record("Pretraining", *runs["pretrain"]),
             training_record("Finetuning", *runs["finetune"], finetune=True), curves(run, runs),
             scores(evaluations, run) if evaluations else "## Evaluation\n\nNot run (no eval/ metrics).\n",
             step_times(timings, runs, evaluations.get("eval", {})),
             samples(os.path.join(run, "eval"), evaluations.get("eval", {}), args.samples),
             commands(timings, configs)]
    path = os.path.join(run, "REPORT.md")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(parts))
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
