"""The report's data section: the pretraining corpus and the finetuning sets as prepare_owt.py
and prepare_finetune.py recorded them (their meta.json files), and the task mix the finetuning
run really drew (recorded by finetune.py in its checkpoints)."""
import json
import os

from provenance import relative


def read_meta(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def markdown_table(header, rows):
    return ("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|\n"
            + "".join("| " + " | ".join(str(c) for c in row) + " |\n" for row in rows))


def corpus(data_dir):
    meta = read_meta(os.path.join(data_dir, "meta.json")) if data_dir else None
    if meta is None:
        return f"Pretraining corpus: no meta.json in `{data_dir}` (not prepared by prepare_owt.py here).\n"
    splits, dec = meta["splits"], meta.get("decontamination", {})
    out = (f"Pretraining corpus `{relative(data_dir)}`, from `{relative(meta['source'])}` "
           f"({meta['source_bytes'] / 1e6:,.1f} MB of text read"
           + (f", stopped by --{meta['stopped_by'].replace('_', '-')}" if meta.get("stopped_by") else "") + "):\n\n")
    out += markdown_table(("split", "tokens", "documents"),
                          [(s, f"{v['tokens']:,}", f"{v['documents']:,}") for s, v in splits.items()])
    if dec.get("enabled"):
        short = (f", or for containing one of the {dec['short_texts_matched_whole']:,} shorter ones "
                 f"({dec['min_words']}-{dec['n'] - 1} words) whole; {dec['texts_too_short']:,} texts under "
                 f"{dec['min_words']} words are not matched" if "min_words" in dec else "")  # older meta.json: none
        out += (f"\nDecontamination: {dec['documents_dropped']:,} documents dropped for sharing a {dec['n']}-word "
                f"span with the evaluation texts ({dec['eval_ngrams']:,} distinct {dec['n']}-grams){short}.\n")
    else:
        out += "\nDecontamination: off (documents may overlap the evaluation texts).\n"
    return out


def finetune_sets(finetune_dir, task_names):
    rows = []
    for task in task_names:
        meta = read_meta(os.path.join(finetune_dir, task, "meta.json"))
        if meta is None:
            rows.append((task, "-", "no meta.json", "", "", ""))
            continue
        for split, s in meta["splits"].items():
            rows.append((task, split, f"{s['examples']:,}", f"{s['tokens']:,}", f"{s['inputs_cut']:,}",
                         f"{s['targets_cut']:,}"))
    return (f"\nFinetuning sets `{relative(finetune_dir)}` (prepare_finetune.py):\n\n"
            + markdown_table(("task", "split", "examples", "tokens", "inputs cut", "targets cut"), rows))


def realised_mix(mix):
    if not mix:
        return "\nRealised task mix: not recorded (a checkpoint from before finetune.py recorded it).\n"
    drawn = sum(mix["examples"].values()) or 1
    rows = [(task, f"{n:,}", f"{n / drawn:.1%}") for task, n in mix["examples"].items()]
    return (f"\nRealised task mix: the examples the first {mix['batches']:,} training batches really hold (drawn "
            f"exactly as training draws them), to set beside the configured weights; replayed pretraining text "
            f"fills {mix['replay_positions']:.1%} of the positions.\n\n"
            + markdown_table(("task", "examples", "share"), rows))


def data_section(pre_cfg, finetuned):
    """finetuned: the summary of the finetuned checkpoint (its config, task names, realised mix)."""
    out = "## Data\n\n" + corpus((pre_cfg or {}).get("data_dir"))
    if finetuned and finetuned.get("config"):
        out += finetune_sets(finetuned["config"]["finetune_dir"], finetuned.get("tasks") or [])
        out += realised_mix(finetuned.get("realised_mix"))
    return out
