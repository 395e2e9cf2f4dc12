"""Benchmark prepare_owt.py: speed and peak memory at several --max-tokens caps.

Peak memory should not grow with the cap (documents are streamed and written in chunks).
Each run is a subprocess. tokens per CPU-second (user+system of the run and its workers) does not
depend on how busy the machine is; wall-clock tokens/s does. Memory is measured two ways:
  tree RSS / PSS  sum over the process and its workers, polled from /proc every 0.05 s
                  (RSS counts pages shared after fork once per process; PSS splits them)
  max RSS         the largest single process (kernel's ru_maxrss from wait4, workers included)

    python bench/bench_prepare.py [--source ../shared/data/webtext] [--max-tokens 2000000 8000000]
Writes out/bench/prepare.json.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import run_main, write_json  # noqa: E402


def descendants(pid):
    """pid and all its live descendants, from the parent ids in /proc/*/stat."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces
            except (OSError, IndexError, ValueError):  # the process just exited
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo.extend(children.get(out[-1], []))
    return out


def memory_kb(pid):
    """(RSS, PSS) of one process in kB; zeros if it is gone."""
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values.get("Rss", 0), values.get("Pss", 0)


def run_once(cmd):
    """Run cmd; return (seconds, CPU seconds of the whole tree, peak tree RSS MB, peak tree PSS MB,
    max single-process RSS MB)."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_rss = peak_pss = 0
    while True:
        rss = pss = 0
        for pid in descendants(proc.pid):
            r, p = memory_kb(pid)
            rss, pss = rss + r, pss + p
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        # WNOHANG wait4: reaps the child when done and gives its rusage, workers included
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.05)
    seconds = time.time() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it, not Popen
    err = proc.stderr.read()
    if proc.returncode != 0:
        sys.exit(f"prepare_owt.py failed ({proc.returncode}):\n{err[-2000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, peak_rss / 1024, peak_pss / 1024, usage.ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=os.path.join(ROOT, "..", "shared", "data", "webtext"))
    p.add_argument("--max-tokens", type=int, nargs="+", default=[2_000_000, 8_000_000])
    p.add_argument("--num-proc", type=int, help="default: prepare_owt.py's default")
    p.add_argument("--decontaminate", action="store_true", help="also pass --decontaminate --data-root")
    p.add_argument("--data-root", default=os.path.join(ROOT, "..", "shared", "data"))
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench", "prepare.json"))
    args = p.parse_args()
    env_note = {k: os.environ.get(k) for k in ("TIKTOKEN_CACHE_DIR", "HF_DATASETS_OFFLINE")}
    runs = []
    print(f"{'max_tokens':>12} {'tokens':>12} {'seconds':>8} {'tokens/s':>10} {'tok/CPU-s':>10} {'tree RSS MB':>12} "
          f"{'tree PSS MB':>12} {'max RSS MB':>11}")
    for cap in args.max_tokens:
        with tempfile.TemporaryDirectory() as out_dir:
            cmd = [sys.executable, "prepare_owt.py", "--source", args.source, "--out-dir", out_dir,
                   "--max-tokens", str(cap)]
            if args.num_proc:
                cmd += ["--num-proc", str(args.num_proc)]
            if args.decontaminate:
                cmd += ["--decontaminate", "--data-root", args.data_root]
            seconds, cpu, rss, pss, maxrss = run_once(cmd)
            with open(os.path.join(out_dir, "owt", "meta.json")) as f:
                meta = json.load(f)
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        run = {"max_tokens": cap, "tokens": tokens, "seconds": round(seconds, 2),
               "tokens_per_s": round(tokens / seconds),
               "cpu_s": round(cpu, 2), "tokens_per_cpu_s": round(tokens / cpu), "peak_tree_rss_mb": round(rss, 1),
               "peak_tree_pss_mb": round(pss, 1), "max_process_rss_mb": round(maxrss, 1),
               "num_proc": meta["args"]["num_proc"], "decontaminate": args.decontaminate,
               "documents_dropped": meta["decontamination"]["documents_dropped"]}
        runs.append(run)
        print(f"{cap:>12,} {tokens:>12,} {seconds:>8.1f} {run['tokens_per_s']:>10,} {run['tokens_per_cpu_s']:>10,} {rss:>12.0f} "
              f"{pss:>12.0f} {maxrss:>11.0f}")
    write_json(args.out, {"source": args.source, "cpu_count": os.cpu_count(), "env": env_note, "runs": runs,
                          "note": "seconds: wall time of the whole subprocess, startup included (depends on machine "
                          "load); cpu_s: user+system time of it and its workers"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
