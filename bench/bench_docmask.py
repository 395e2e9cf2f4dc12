"""What isolating packed finetuning examples costs: forward + backward of one real finetuning
batch with plain causal attention (examples see the ones before them) against per-document
attention (each example alone from position 0). On CPU the documents are a dense SDPA mask; on
CUDA they are FlexAttention's block mask (add --compile=true: FlexAttention is only fused when
compiled). The phases are interleaved, one of each per round; medians over --runs.

    python bench/bench_docmask.py                                   # CPU preset, 1 thread
    python bench/bench_docmask.py config/pretrain_gpt2_124m_1gpu.py --device=cuda --compile=true \
        --finetune-dir data/finetune_1024
Writes out/bench/docmask.json.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tasks  # noqa: E402
from common import run_main, write_json  # noqa: E402
from config import parse_config, TrainConfig  # noqa: E402
from data import FinetuneMixture  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from runtime import setup_runtime  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", nargs="?", default=os.path.join(ROOT, "config", "pretrain_cpu.py"))
    p.add_argument("--finetune-dir", default="data/finetune_512")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench", "docmask.json"))
    args, overrides = p.parse_known_args()
    cfg = parse_config(TrainConfig, [args.preset] + overrides)
    rt = setup_runtime(cfg.device, cfg.dtype, args.threads)
    model = GPT(GPTConfig(**cfg.model_fields())).to(rt.device)
    step = torch.compile(model) if cfg.compile else model
    names = ("cnn_dailymail", "squad", "sst2")
    splits = {n: tasks.FinetuneSplit(os.path.join(args.finetune_dir, n, "train")) for n in names}
    mix = FinetuneMixture(splits, {n: 1.0 for n in names}, cfg.block_size, cfg.batch_size, seed=0)
    x, y, rows, weights, positions = (t.to(rt.device) for t in mix.batch(0, 0))
    phases = {"causal": None, "documents": positions}

    def run(pos):
        with rt.autocast():
            _, loss = step(x, targets=y, loss_rows=rows, loss_weights=weights, positions=pos)
        loss.backward()
        if rt.device.type == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in phases}
    for k in range(args.runs + 2):  # two warm-up rounds (compilation, allocator)
        for name, pos in phases.items():
            started = time.perf_counter()
            run(pos)
            if k >= 2:
                times[name].append((time.perf_counter() - started) * 1000)
    medians = {name: statistics.median(t) for name, t in times.items()}
    tokens = cfg.batch_size * cfg.block_size
    for name, ms in medians.items():
        print(f"{name:<10} {ms:8.1f} ms  {tokens / ms * 1000:10,.0f} tok/s  x{ms / medians['causal']:.3f}")
    write_json(args.out, {"device": str(rt.device), "batch": [cfg.batch_size, cfg.block_size],
                          "documents_per_row": float((positions == 0).sum()) / cfg.batch_size,
                          "median_ms": medians, "runs_ms": times})


if __name__ == "__main__":
    run_main(main)
