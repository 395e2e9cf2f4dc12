"""The first run on a GPU: does every path a GPU preset takes work, how long will the presets take,
and does the default recipe beat the GPT-2 one at the 124M shape too?

    python bench/gpu_check.py                        # one H100/H200: about 12 minutes (estimated, see below)
    python bench/gpu_check.py --device cpu --tiny    # a tiny stand-in, under 2 minutes (CI runs it)

It trains the default recipe (RoPE, RMSNorm, SwiGLU, QK-norm, untied head, Muon) at the 124M
preset's shape (config/pretrain_gpt2_124m_1gpu.py, bf16 autocast, torch.compile, flash SDPA)
through the real training loop (trainer.train) and measures:
  pretrain   tokens/s, MFU and peak memory over --steps steps on random tokens
  finetune   the same with finetuning-shaped batches (config/finetune_gpu.py's batch and optimizer on
             the pretrained architecture; 12% of positions carry loss, as in the real mixture, so
             only they go through the output layer)
  generate   batched greedy decoding (GPT.generate) and beam search (generation.batched_beam_search), new
             tokens/s after summarization-sized prompts
  recipes    the default recipe against the GPT-2 one (config/gpt2_classic.py on the same preset):
             --recipe-steps steps each on the same batches of real text (<data-dir>/train.bin), the
             preset's warmup and cosine decay compressed into those steps, then the loss on the same
             --recipe-eval-windows windows of val.bin; skipped, with a line saying so, without the data
and from the speeds estimates each training and evaluation step's wall time for the gpu and full
pipeline presets (full: 8 GPUs, assuming linear scaling). Prints tables; writes JSON.

The 12 minutes are an estimate, not a timing: it assumes ~300k tokens/s for this 162M-parameter
model (untied head) on one H100/H200 and ~1 minute to compile each of the four models; the
training is 26M + 13M + 2 x 39M tokens, about 7 minutes at that rate.
"""
import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import run_main, write_json  # noqa: E402
from config import FinetuneConfig, TrainConfig, parse_config  # noqa: E402
from data import RandomTokens, TokenWindows, open_tokens  # noqa: E402
from generation import batched_beam_search  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from plan import configured_tokens_per_step  # noqa: E402
from runtime import setup_runtime  # noqa: E402
from scoring import evaluate_owt  # noqa: E402
from trainer import train  # noqa: E402

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=128", "--batch_size=4",
        "--tokens_per_step=512"]
LOSS_FRACTION = 0.12  # share of finetuning positions that carry loss (the README's CPU run: 11.3%)
PRESET = "config/pretrain_gpt2_124m_1gpu.py"  # the shape (and recipe) every measurement trains
# examples the gpu/full presets evaluate (test/dev splits) and their mean new tokens
EVAL_EXAMPLES = {"cnn_dailymail": (11490, 60), "squad": (10570, 6)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model: proves the paths, measures nothing useful")
    p.add_argument("--steps", type=int, default=None, help="training steps per measurement (default 200; tiny 12)")
    p.add_argument("--compile", default=None, help="true/false (default: true on CUDA)")
    p.add_argument("--recipe-steps", type=int, default=None,
                   help="steps per recipe in the side-by-side (default 300; tiny 8)")
    p.add_argument("--recipe-eval-windows", type=int, default=None,
                   help="validation windows that score each recipe (default 200; tiny 4)")
    p.add_argument("--data-dir", default="data/owt",
                   help="train.bin / val.bin for the side-by-side (default data/owt, as the presets; without them it "
                        "is skipped)")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench", "gpu_check.json"))
    return p.parse_args(argv)


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; only grows


def random_sources(cfg, batch_size, loss_fraction):
    source = RandomTokens(cfg.block_size, batch_size, cfg.seed, loss_fraction)
    return source, {"val": source}


def text_sources(data_dir):
    """Windows of real text, as train.py draws them: the same seed gives every recipe the same batches."""
    def sources(cfg, batch_size, loss_fraction):
        train_windows, val_windows = (TokenWindows(os.path.join(data_dir, f"{split}.bin"), cfg.block_size,
                                                   batch_size, cfg.seed, split_id=i)
                                      for i, split in enumerate(("train", "val")))
        return train_windows, {"val": val_windows}
    return sources


def measure_training(cls, presets, overrides, steps, sources=random_sources, loss_fraction=0.0):
    """Train a fresh model through the real loop for `steps` steps. Speeds are the medians of the
    logged rows after the first (which holds compilation); wall_s includes compilation."""
    out = tempfile.mkdtemp(prefix="gpu_check_")  # removed below: a 162M run's checkpoints are ~2 GB
    cfg = parse_config(cls, [*(os.path.join(ROOT, p) for p in presets), *overrides, f"--out_dir={out}", "--overwrite",
                             f"--max_iters={steps}", f"--log_interval={max(1, steps // 6)}", "--eval_iters=1",
                             f"--eval_interval={10 ** 9}"])
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.num_threads, cfg.backend)
    # each model compiles afresh, as in its own run: every GPT's graphs share one cache, whose recompile
    # limit (8) could otherwise leave a later model running eager
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg.model_fields()))
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    started = time.perf_counter()
    train(cfg, model, lambda batch_size: sources(cfg, batch_size, loss_fraction), rt)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r["type"] == "train"][1:]
    shutil.rmtree(out, ignore_errors=True)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    return model, rt, {"tokens_per_step": tokens_per_step, "steps": steps, "tokens": tokens_per_step * steps,
                       "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
                       "mfu": statistics.median(r["mfu"] for r in rows), "peak_mem_mib": peak_memory_mib(rt.device),
                       "wall_s": time.perf_counter() - started, "dtype": str(rt.dtype).removeprefix("torch."),
                       "compile": cfg.compile}


def compare_recipes(args, overrides):
    """The default recipe and the GPT-2 one (config/gpt2_classic.py) at the 124M shape: the same steps
    on the same batches of real text, the schedule compressed to them, then the same validation windows.
    None (with a line saying why) when the data is not prepared."""
    if not all(os.path.isfile(os.path.join(args.data_dir, f"{s}.bin")) for s in ("train", "val")):
        print(f"\nrecipe side-by-side skipped: no train.bin and val.bin in {args.data_dir}; prepare them with "
              f"python prepare_owt.py --max-tokens 50000000 (writes data/owt), or pass --data-dir", flush=True)
        return None
    steps = args.recipe_steps or (8 if args.tiny else 300)
    windows = args.recipe_eval_windows or (4 if args.tiny else 200)
    val = open_tokens(os.path.join(args.data_dir, "val.bin"))
    schedule = [f"--warmup_iters={max(1, steps // 10)}", "--lr_decay_iters=0"]  # down to min_lr at the last step
    rows = {}
    for name, recipe in (("default", []), ("classic", ["config/gpt2_classic.py"])):
        model, rt, row = measure_training(TrainConfig, [PRESET, *recipe], overrides + schedule, steps,
                                          text_sources(args.data_dir))
        scores = evaluate_owt(model, val, windows, rt.autocast)["scores"]
        rows[name] = {**row, "val_loss": scores["loss"], "val_windows": scores["windows"]}
        del model
    return {**rows, "difference": rows["default"]["val_loss"] - rows["classic"]["val_loss"],
            "data_dir": args.data_dir}


@torch.no_grad()
def measure_generation(model, rt, tiny):
    """New tokens/s: batched greedy (64 prompts) and batched beam search (4 beams, 16 prompts)."""
    model.eval()
    prompt_len, new, batch = (64, 16, 4) if tiny else (700, 64, 64)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 50257, (batch, prompt_len), generator=g).tolist()
    out = {}
    with rt.autocast():
        model.generate(prompts[:2], 2)  # warm-up
        start = time.perf_counter()
        tokens = sum(len(t) for t in model.generate(prompts, new, stop_tokens=()))
        out["greedy_tokens_per_s"] = tokens / (time.perf_counter() - start)
        out["greedy_batch"] = batch
        start = time.perf_counter()  # evaluate.py's way: a batch of prompts (its default batch size)
        beams = batched_beam_search(model, prompts[:16], 4, new, no_repeat_ngram_size=3, stop_tokens=())
        elapsed = time.perf_counter() - start
        out["beam4_batch"], out["beam4_seconds_per_example"] = len(beams), elapsed / len(beams)
        out["beam4_tokens_per_s"] = sum(len(b) for b in beams) / elapsed
    out["prompt_len"], out["new_tokens"] = prompt_len, new
    return out


def estimates(pre, ft, gen):
    """Hours per step for the gpu preset (1 GPU) and the full preset (8 GPUs, linear scaling)."""
    rows = {}
    for name, preset, ft_preset, gpus in (("gpu", "config/pretrain_gpt2_124m_1gpu.py", "config/finetune_gpu.py", 1),
                                          ("full", "config/pretrain_gpt2_124m.py", "config/finetune_gpu.py", 8)):
        p = parse_config(TrainConfig, [os.path.join(ROOT, preset)])
        f = parse_config(FinetuneConfig, [os.path.join(ROOT, ft_preset)] +
                         (["--tokens_per_step=131072"] if gpus == 8 else []))
        pre_tokens = p.max_iters * configured_tokens_per_step(p)
        ft_tokens = f.max_iters * configured_tokens_per_step(f)
        cnn, squad = EVAL_EXAMPLES["cnn_dailymail"], EVAL_EXAMPLES["squad"]
        rows[name] = {"pretrain_h": pre_tokens / (pre["tokens_per_s"] * gpus) / 3600,
                      "finetune_h": ft_tokens / (ft["tokens_per_s"] * gpus) / 3600,
                      "evaluate_cnn_beam4_h": cnn[0] * gen["beam4_seconds_per_example"] * cnn[1] / gen["new_tokens"]
                      / 3600,
                      "evaluate_squad_greedy_h": squad[0] * squad[1] / gen["greedy_tokens_per_s"] / 3600,
                      "pretrain_tokens": pre_tokens, "finetune_tokens": ft_tokens, "gpus": gpus}
    return rows


def main(argv=None):
    args = parse_args(argv)
    compile_flag = args.compile or ("true" if args.device.startswith("cuda") else "false")
    overrides = [f"--device={args.device}", f"--compile={compile_flag}", "--dtype=auto"] + (TINY if args.tiny else [])
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"gpu_check on {name} (torch {torch.__version__}){' --tiny' if args.tiny else ''}", flush=True)
    steps = args.steps or (12 if args.tiny else 200)
    model, rt, pre = measure_training(TrainConfig, [PRESET], overrides + ["--warmup_iters=10"], steps)
    # a real finetune takes the pretrained checkpoint's architecture, not FinetuneConfig's defaults
    architecture = [f"--{k}={v}" for k, v in dataclasses.asdict(model.config).items()]
    _, _, ft = measure_training(FinetuneConfig, ["config/finetune_gpu.py"],
                                architecture + overrides + ["--init_from=", "--warmup_iters=10"], steps,
                                loss_fraction=LOSS_FRACTION)
    gen = measure_generation(model, rt, args.tiny)
    est = estimates(pre, ft, gen)
    print(f"\n{'':10} {'tok/s':>12} {'MFU':>7} {'peak MiB':>9} {'wall s':>7}")
    for label, r in (("pretrain", pre), ("finetune", ft)):
        print(f"{label:10} {r['tokens_per_s']:12,.0f} {r['mfu'] * 100:6.1f}% {r['peak_mem_mib']:9,.0f} {r['wall_s']:7.0f}")
    print(f"generate   greedy {gen['greedy_tokens_per_s']:,.0f} new tok/s at batch {gen['greedy_batch']}; "
          f"beam 4 at batch {gen['beam4_batch']}: {gen['beam4_tokens_per_s']:,.0f} new tok/s, "
          f"{gen['beam4_seconds_per_example']:.2f} s/example")
    print("\nestimated hours per pipeline step (from the rates above):")
    for preset, r in est.items():
        print(f"  {preset:5} ({r['gpus']} GPU): pretrain {r['pretrain_h']:.1f}, finetune {r['finetune_h']:.2f}, "
              f"evaluate CNN/DM beam 4 {r['evaluate_cnn_beam4_h']:.2f}, SQuAD greedy {r['evaluate_squad_greedy_h']:.2f}")
    result = {"device": name, "torch": torch.__version__, "tiny": args.tiny, "pretrain": pre, "finetune": ft,
              "generate": gen, "estimates_h": est, "recipes": None}
    write_json(args.out, result)  # the speeds survive a side-by-side that fails or runs out of time
    result["recipes"] = recipes = compare_recipes(args, overrides)
    if recipes:
        d, c = recipes["default"], recipes["classic"]
        print(f"\nrecipes at this shape: {d['steps']} steps, {d['tokens']:,} tokens each, the same batches; "
              f"val loss over {d['val_windows']} windows of {args.data_dir}/val.bin")
        print(f"{'recipe':10} {'val loss':>9} {'tok/s':>12} {'wall s':>7}")
        for label, r in (("default", d), ("classic", c)):
            print(f"{label:10} {r['val_loss']:9.4f} {r['tokens_per_s']:12,.0f} {r['wall_s']:7.0f}")
        print(f"default - classic: {recipes['difference']:+.4f} nats")
    write_json(args.out, result)
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    return result


if __name__ == "__main__":
    run_main(main)
