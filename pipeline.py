"""From nothing to model.pt, scores and a report, in one command:

    python pipeline.py --preset smoke --data-root ../shared/data    # minutes: proves the path
    python pipeline.py --preset cpu                                 # the CPU reference run
    python pipeline.py --preset gpu                                 # one GPU, a few hours

Steps: prepare_owt -> pretrain -> prepare_finetune -> finetune -> evaluate (the finetuned model)
-> evaluate_pretrained_<K>shot (the pretrained model with --shots K, for each K of
pretrained_shots: what pretraining alone gives) -> evaluate_pretrained_gpt2 (CNN/DM by GPT-2's
zero-shot protocol, the one its published scores used) -> report. Each is
the ordinary script with its ordinary config, printed before it runs, so any one can be rerun
or replaced by hand. A step is skipped when its outputs exist and its command, inputs and, for
a training step, resolved settings (its config with every preset and default applied) are
unchanged since it last finished (a stamp in out/<run>/pipeline/); a step whose stamp is
missing reruns, and training steps resume from their checkpoint, so an interrupted pipeline
picks up where it stopped. A finished training run whose settings changed is moved aside, not
deleted. Deleting an output reruns that step and the steps after it that read it.
"""
import argparse
import dataclasses
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import tasks
from common import UserError, run_main, write_json
from corpus import LOCAL_FLAG_ENV
from provenance import git_state
from trainer import STOPPED_BY_SIGNAL, STOPPED_FOR_TIME
from config import FinetuneConfig, TrainConfig, parse_config


@dataclass
class PipelineConfig:
    run: str = "smoke"  # outputs go to out/<run>/
    owt_name: str = "owt_smoke"  # data/<owt_name>/ from prepare_owt.py
    owt_max_tokens: int = 0  # 0: the whole source
    owt_val_fraction: float = 0.005  # share of documents held out for validation
    pretrain_config: str = "config/pretrain_smoke.py"
    pretrain_args: str = ""  # extra --key=value overrides
    finetune_config: str = "config/finetune_smoke.py"
    finetune_args: str = ""
    finetune_block_size: int = 0  # 0: the pretraining config's block_size (the model's context)
    finetune_limit: int = 0  # rows per split for prepare_finetune (0: all)
    eval_limit: int = 0  # examples per task for evaluate (0: all)
    eval_args: str = ""
    pretrained_shots: str = "0,3"  # also score the pretrained model with each --shots (comma-separated; "" none)
    gpt2_protocol: bool = True  # also score the pretrained model on CNN/DM as GPT-2's paper did (the anchor's protocol)
    nproc: int = 1  # >1 runs the training and evaluation steps under torchrun


@dataclass
class Step:
    name: str
    command: list
    inputs: list  # files whose change makes the step rerun
    outputs: list  # files the step must leave behind
    resumable_dir: str = ""  # a training run's out_dir: resumed when unfinished, moved aside when outdated
    settings: str = ""  # a training step's resolved config: a changed value reruns it, a preset's comment does not


ROOT = os.path.dirname(os.path.abspath(__file__))


def in_repo(path):
    """Scripts and presets are found beside this file, so the pipeline can run from any folder
    (data/ and out/ are made in the current one)."""
    return path if os.path.exists(path) else os.path.join(ROOT, path)


def python_cmd(script, cfg):
    if cfg.nproc > 1 and script in ("train.py", "finetune.py", "evaluate.py"):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
                *torchrun_signal_flags(), in_repo(script)]
    return [sys.executable, in_repo(script)]


@functools.cache
def torchrun_signal_flags():
    """torchrun passes on only SIGTERM, SIGINT, SIGHUP and SIGQUIT by default: add SIGUSR1 (what SLURM's
    --signal sends before a job's time is up) and give the workers time to write their checkpoint,
    where this torchrun has the flags (torch 2.9 and later)."""
    from torch.distributed.run import get_args_parser
    known = get_args_parser()._option_string_actions
    flags = {"--signals-to-handle": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout": "120"}
    return [f"{flag}={value}" for flag, value in flags.items() if flag in known]


def finetune_block_size(cfg):
    """Set once, in the pretraining config: the finetuning data fills the model's context."""
    if cfg.finetune_block_size:
        return cfg.finetune_block_size
    return parse_config(TrainConfig, [in_repo(cfg.pretrain_config)] + cfg.pretrain_args.split()).block_size


def resolved(config_class, argv):
    return json.dumps(dataclasses.asdict(parse_config(config_class, argv)), sort_keys=True)


def build_steps(cfg, data_root):
    out, owt = os.path.join("out", cfg.run), os.path.join("data", cfg.owt_name)
    block_size = finetune_block_size(cfg)
    ft_data = os.path.join("data", f"finetune_{block_size}" +
                           (f"_limit{cfg.finetune_limit}" if cfg.finetune_limit else ""))
    root = [f"--data-root={data_root}"] if data_root else []
    pre_cfg, ft_cfg = in_repo(cfg.pretrain_config), in_repo(cfg.finetune_config)
    task_meta = [os.path.join(ft_data, t, "meta.json") for t in tasks.TASKS]
    pre_ckpt, model_pt = f"{out}/pretrain/ckpt.pt", f"{out}/finetune/model.pt"
    metrics = [f"{t.name}_{t.eval_splits[0]}_metrics.json" for t in tasks.TASKS.values()]
    evals = [f"{out}/eval/{m}" for m in metrics]
    eval_cmd = [f"--limit={cfg.eval_limit}"] if cfg.eval_limit else []
    eval_cmd += root + cfg.eval_args.split()
    shots = [k.strip() for k in cfg.pretrained_shots.split(",") if k.strip()]
    if not all(k.isdigit() for k in shots):
        raise UserError(f"pretrained_shots={cfg.pretrained_shots!r}: give comma-separated counts like 0,3 (or '')")
    pretrain_argv = [pre_cfg, f"--data_dir={owt}", f"--out_dir={out}/pretrain", "--resume", *cfg.pretrain_args.split()]
    finetune_argv = [ft_cfg, f"--init_from={pre_ckpt}", f"--finetune_dir={ft_data}", f"--data_dir={owt}",
                     f"--out_dir={out}/finetune", "--resume", *cfg.finetune_args.split()]
    pretrained = [Step(f"evaluate_pretrained_{k}shot", python_cmd("evaluate.py", cfg) + [
                  "--task=all", f"--ckpt={pre_ckpt}", f"--shots={k}", f"--out={out}/eval_pretrained_{k}shot"]
                  + eval_cmd, [pre_ckpt, in_repo("tasks.py"), in_repo("fewshot.py")],
                  [f"{out}/eval_pretrained_{k}shot/{m}" for m in metrics]) for k in shots]
    if cfg.gpt2_protocol:  # like for like with the report's GPT-2 anchor: its decoding, not eval_args'
        out_dir = f"{out}/eval_pretrained_gpt2"
        pretrained.append(Step("evaluate_pretrained_gpt2", python_cmd("evaluate.py", cfg) + [
            "--task=cnn_dailymail", f"--ckpt={pre_ckpt}", "--protocol=gpt2", f"--out={out_dir}"]
            + ([f"--limit={cfg.eval_limit}"] if cfg.eval_limit else []) + root,
            [pre_ckpt, in_repo("tasks.py"), in_repo("metrics.py")],
            [f"{out_dir}/cnn_dailymail_{tasks.TASKS['cnn_dailymail'].eval_splits[0]}_metrics.json"]))
    return [
        Step("prepare_owt", python_cmd("prepare_owt.py", cfg) + ["--name", cfg.owt_name, "--decontaminate",
                                                               f"--val-fraction={cfg.owt_val_fraction}"]
             + (["--source", os.path.join(data_root, "webtext")] if data_root else [])
             + ([f"--max-tokens={cfg.owt_max_tokens}"] if cfg.owt_max_tokens else []) + root,
             [], [f"{owt}/train.bin", f"{owt}/val.bin", f"{owt}/meta.json"]),
        Step("pretrain", python_cmd("train.py", cfg) + pretrain_argv, [f"{owt}/meta.json"], [pre_ckpt],
             resumable_dir=f"{out}/pretrain", settings=resolved(TrainConfig, pretrain_argv)),
        Step("prepare_finetune", python_cmd("prepare_finetune.py", cfg) + [
             f"--block-size={block_size}", f"--out-dir={ft_data}"]
             + ([f"--limit={cfg.finetune_limit}"] if cfg.finetune_limit else []) + root,
             [in_repo("tasks.py"), in_repo("prepare_finetune.py")], task_meta),
        Step("finetune", python_cmd("finetune.py", cfg) + finetune_argv, [pre_ckpt] + task_meta, [model_pt],
             resumable_dir=f"{out}/finetune", settings=resolved(FinetuneConfig, finetune_argv)),
        Step("evaluate", python_cmd("evaluate.py", cfg) + ["--task=all", f"--ckpt={model_pt}",
             f"--out={out}/eval", f"--owt-bin={owt}/val.bin"] + eval_cmd,
             [model_pt, in_repo("tasks.py"), in_repo("metrics.py")], evals),
        *pretrained,
        Step("report", python_cmd("report.py", cfg) + [out],
             evals + [p for step in pretrained for p in step.outputs] + [pre_ckpt, model_pt], [f"{out}/REPORT.md"]),
    ]


def signature(step):
    """What the step's last successful run depended on: its command and its inputs' states."""
    parts = [" ".join(step.command), step.settings]
    for path in step.inputs:
        st = os.stat(path) if os.path.exists(path) else None
        parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}" if st else f"{path}:missing")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def run_step(step, stamp_dir, dry_run):
    stamp_path = os.path.join(stamp_dir, step.name + ".json")
    stamp = json.load(open(stamp_path)) if os.path.exists(stamp_path) else None
    sig = signature(step)
    if stamp and stamp["signature"] == sig and all(os.path.exists(p) for p in step.outputs):
        print(f"[{step.name}] up to date, skipped")
        return stamp["seconds"], True
    if stamp and stamp["signature"] != sig and step.resumable_dir and os.path.isdir(step.resumable_dir):
        # it finished once with other settings or inputs: its checkpoint belongs to that run, so the
        # step starts afresh, and the finished run is kept (it may have cost hours)
        kept = f"{step.resumable_dir}.outdated-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"[{step.name}] its settings or inputs changed since it finished: starting afresh; the finished "
              f"run is kept in {kept}", flush=True)
        if not dry_run:
            os.replace(step.resumable_dir, kept)
    print(f"[{step.name}] $ " + " ".join(step.command), flush=True)
    if dry_run:
        return 0.0, False
    started = time.time()
    # a step's hint about local data names the pipeline's flag, not the script's own
    RUNNING[:] = [subprocess.Popen(step.command, env={**os.environ, LOCAL_FLAG_ENV: "--data-root"})]
    result = RUNNING[0]
    result.wait()
    RUNNING.clear()
    stopped = why_stopped(step, result.returncode)
    if stopped:
        print(f"[{step.name}] stopped with a checkpoint before the end ("
              f"{'its --max_minutes' if stopped == 'time' else 'a signal'}); rerun the pipeline to continue: "
              f"finished steps are skipped and training resumes", flush=True)
        raise SystemExit(STOPPED_FOR_TIME if stopped == "time" else STOPPED_BY_SIGNAL)
    if result.returncode != 0:
        raise UserError(f"step {step.name} failed (exit {result.returncode}); fix the cause above and rerun "
                        f"the pipeline: finished steps are skipped and training resumes")
    missing = [p for p in step.outputs if not os.path.exists(p)]
    if missing:
        raise UserError(f"step {step.name} finished without writing {missing[0]}")
    seconds = time.time() - started
    write_json(stamp_path, {"signature": signature(step), "command": step.command, "seconds": seconds,
                            "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    return seconds, False


SIGUSR1_SEEN, RUNNING = [], []  # the signal, once received; the step's process while it runs


def wait_for_the_step(signum, frame):
    """SIGUSR1 (SLURM's warning before a job's time is up): passed on to the running step, which
    checkpoints and stops if it trains (a training run takes a repeat, from SLURM itself, as the same
    request); the pipeline then stops instead of starting the next step."""
    SIGUSR1_SEEN.append(signum)
    for process in RUNNING:
        process.send_signal(signum)
    print(f"\nsignal {signum}: the pipeline stops once the running step has stopped", flush=True)


def why_stopped(step, returncode):
    """"time" or "signal" when a training step stopped early with a checkpoint, else None. Under torchrun
    the exit status is torchrun's own, so the run's log says it: its last record is a stop record."""
    if not returncode or not step.resumable_dir:
        return None
    if returncode in (STOPPED_FOR_TIME, STOPPED_BY_SIGNAL):
        return "time" if returncode == STOPPED_FOR_TIME else "signal"
    try:
        with open(os.path.join(step.resumable_dir, "metrics.jsonl")) as f:
            last = json.loads(f.readlines()[-1])
    except (OSError, IndexError, ValueError):
        return "signal" if SIGUSR1_SEEN else None
    return last.get("reason") if last.get("type") == "stop" else ("signal" if SIGUSR1_SEEN else None)


def main(argv=None):
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, wait_for_the_step)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smoke", help="config/pipeline_<preset>.py: smoke, cpu, gpu or full")
    p.add_argument("--data-root", default=None,
                   help="local copies of the data sets in the hub's schemas (e.g. ../shared/data); default: the hub")
    p.add_argument("--dry-run", action="store_true", help="print the steps that would run")
    p.add_argument("overrides", nargs="*", help="--key=value overrides of the preset (after --)")
    typed = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    preset = in_repo(os.path.join("config", f"pipeline_{args.preset}.py"))
    if not os.path.exists(preset):
        raise UserError(f"no preset {args.preset!r}: {preset} not found; try smoke, cpu, gpu or full")
    cfg = parse_config(PipelineConfig, [preset] + args.overrides)
    if args.data_root and not os.path.isdir(args.data_root):
        raise UserError(f"--data-root {args.data_root} is not a folder")
    stamp_dir = os.path.join("out", cfg.run, "pipeline")
    timings, started, code = {}, time.strftime("%Y-%m-%d %H:%M:%S %Z"), git_state()
    for step in build_steps(cfg, args.data_root):
        seconds, skipped = run_step(step, stamp_dir, args.dry_run)
        if SIGUSR1_SEEN:
            raise SystemExit(STOPPED_BY_SIGNAL)
        timings[step.name] = {"seconds": round(seconds, 1), "skipped": skipped, "command": step.command}
        if not args.dry_run:  # written as it goes: the report step reads it
            write_json(os.path.join(stamp_dir, "timings.json"),
                       {"preset": args.preset, "argv": typed, "started": started, "git": code,
                        "config": dataclasses.asdict(cfg), "data_root": args.data_root, "steps": timings})
    if not args.dry_run:
        print("step times: " + ", ".join(f"{k} {v['seconds'] / 60:.1f} min" for k, v in timings.items()))
        print(f"done: out/{cfg.run}/finetune/model.pt, out/{cfg.run}/eval/, out/{cfg.run}/REPORT.md")


if __name__ == "__main__":
    run_main(main)
