"""Benchmark OMP_WAIT_POLICY: OpenMP's default against PASSIVE, for a short training run and a
short greedy and beam-search evaluation, each a subprocess, on the machine as it is ("idle")
and beside one busy process this script starts itself ("busy").

OpenMP reads OMP_WAIT_POLICY once, when torch loads it. The toolkit sets PASSIVE (common.py)
when the variable is unset, so the "default" runs start the script through a wrapper that
imports torch first: OpenMP then starts with the variable unset, as before the toolkit set it.
Every job uses torch's default thread count (one per core), as a user's run does. The model
has the CPU preset's shape (config/pretrain_cpu.py); the corpus is random tokens (speed does
not depend on them), the evaluation scores evaluate.py's --limit sample of CNN/DailyMail articles.

    python bench/bench_omp.py --data-root ../shared/data
Prints the median seconds of --repeats runs (the policies alternate) and the ratio default /
PASSIVE (above 1: PASSIVE is faster); writes out/bench/omp.json.
"""
import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import run_main, write_json  # noqa: E402

TORCH_FIRST = "import sys, runpy, torch; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="local task data, e.g. ../shared/data")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-iters", type=int, default=3)
    p.add_argument("--limit", type=int, default=4, help="CNN/DailyMail articles to summarise")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--work", default=os.path.join(ROOT, "out", "bench", "omp"))
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench", "omp.json"))
    return p.parse_args(argv)


def jobs(args):
    """name -> script command line (without the interpreter)."""
    run = os.path.join(args.work, "run")
    train = [os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "pretrain_cpu.py"),
             f"--data_dir={args.work}", f"--out_dir={run}", f"--max_iters={args.train_iters}",
             "--eval_interval=100000", "--eval_iters=1", "--overwrite"]
    evaluate = [os.path.join(ROOT, "evaluate.py"), "--task=cnn_dailymail", f"--ckpt={run}/ckpt.pt",
                f"--data-root={args.data_root}", f"--limit={args.limit}", f"--max-new-tokens={args.max_new_tokens}",
                f"--out={args.work}/eval", "--batch-size=4"]
    return {"train": train, "greedy": evaluate + ["--num-beams=1"], "beam": evaluate + ["--num-beams=4"]}


def timed(cmd, policy):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy == "PASSIVE":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        cmd = [sys.executable] + cmd
    else:
        cmd = [sys.executable, "-c", TORCH_FIRST] + cmd
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


@contextlib.contextmanager
def load(kind):
    """Nothing, or one process spinning on a core for as long as the block runs."""
    if kind == "idle":
        yield
        return
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    tokens = np.random.default_rng(0).integers(0, 50257, size=200_000).astype(np.uint16)
    tokens.tofile(os.path.join(args.work, "train.bin"))
    tokens[:20_000].tofile(os.path.join(args.work, "val.bin"))
    commands = jobs(args)
    timed(commands["train"], "PASSIVE")  # the checkpoint the evaluations read; warms the file cache
    results = {}
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    for kind in ("idle", "busy"):
        with load(kind):
            for name, cmd in commands.items():
                times = {"default": [], "PASSIVE": []}
                for r in range(args.repeats):
                    for policy in (("default", "PASSIVE") if r % 2 == 0 else ("PASSIVE", "default")):
                        times[policy].append(timed(cmd, policy))
                row = {p: statistics.median(t) for p, t in times.items()}
                row["ratio"] = row["default"] / row["PASSIVE"]
                results[f"{kind}/{name}"] = {**row, "runs": times}
                print(f"{kind:5s} {name:7s} default {row['default']:6.1f} s   PASSIVE {row['PASSIVE']:6.1f} s   "
                      f"default/PASSIVE {row['ratio']:.2f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    write_json(args.out, {"args": vars(args), "results": results})


if __name__ == "__main__":
    run_main(main)
