"""The first run on a GPU: does every path a GPU preset takes work, how fast is it, how long will the
pipeline presets take, and does the default recipe beat the GPT-2 one at the 124M shape too?

    python bench/gpu_check.py                        # one H100/H200: about 12 minutes (estimated below)
    python bench/gpu_check.py --device cpu --tiny    # a tiny stand-in, under 2 minutes (CI runs it)

Everything runs the code the presets run (trainer.train, runtime's device plan, the decoders that
evaluate.py uses) at the shape of config/pretrain_gpt2_124m_1gpu.py (162M parameters with the untied
head; the default recipe; its dtype, compile setting and batch_size=auto) and measures:
  pretrain   the memory probe's micro-batch, tokens/s, MFU and peak memory over --steps steps of random tokens
  finetune   config/finetune_gpu.py's step on the pretrained architecture: packed rows of 4 documents with
             their positions, 12% of positions carrying loss, attention as runtime.choose_attention picks it
             (FlexAttention's block mask where it runs, as finetune.py does)
  resume     --resume-steps steps with a checkpoint halfway (weights, fused AdamW, Muon, scaler, RNG) reloaded
             by a new Run, against the same steps straight: the weights must be equal
  ddp        with 2 or more GPUs, on all of them (torchrun): the compiled module around DDP, as the trainer
             wraps it, against DDP around the compiled module, tokens/s of each on the same steps
  generate   beam search (4 beams, n-gram blocking 3) and greedy decoding after summarization-sized prompts,
             eager and compiled (generation.compile_decoding, evaluate.py's default on CUDA) on the same
             prompts, at the batch evaluate.py's fitting allows (at most scoring.MAX_BATCH_ROWS rows)
  recipes    the default recipe against the GPT-2 one (config/gpt2_classic.py on the same preset):
             --recipe-steps steps each on the same batches of real text (<data-dir>/train.bin), the
             preset's warmup and cosine decay compressed into those steps, then the loss on the same
             --recipe-eval-windows windows of val.bin; skipped, with a line saying so, without the data
and, with those rates in bench/estimates.py's formulas (the same as the README's per-card table), the
hours of every step of the gpu and full pipeline presets, read from the steps pipeline.py builds for
them (their eval_args and pretrained_shots included; full: 8 GPUs, linear scaling assumed). Prints
tables; writes the JSON after every leg, so a failing leg keeps the figures before it.

The 12 minutes are an estimate, not a timing. They assume ~350k tokens/s for this model on one
H100/H200 and about a minute for each of 6 compiles (the pretraining and finetuning models, the
FlexAttention probe, the decoding step, the two recipes): pretrain 200 x 131k tokens (75 s) and
finetune 200 x 65k (40 s) after the probe's few eager steps, the recipes 2 x 300 x 131k (225 s),
the compiles 360 s; the resume, ddp and decoding legs take seconds each. bench/gpu_session.sh runs
it with fewer steps, in about 6 minutes.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import estimates  # noqa: E402
import memory  # noqa: E402
import trainer  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from common import run_main, write_json  # noqa: E402
from config import FinetuneConfig, TrainConfig, parse_config  # noqa: E402
from data import RandomTokens, TokenWindows, open_tokens, to_device  # noqa: E402
from generation import batched_beam_search, compile_decoding  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from runtime import GPU, choose_attention, known_gpu, setup_runtime, synchronize  # noqa: E402
from scoring import MAX_BATCH_ROWS, evaluate_owt  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=128", "--batch_size=auto", "--tokens_per_step=512"]
LOSS_FRACTION = estimates.LOSS_FRACTION  # share of finetuning positions that carry loss
DOCUMENTS = 4  # packed documents per finetuning row
PRESET = "config/pretrain_gpt2_124m_1gpu.py"  # the shape (and recipe) every measurement trains


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model: proves the paths, measures nothing useful")
    p.add_argument("--steps", type=int, default=None, help="training steps per measurement (default 200; tiny 12)")
    p.add_argument("--resume-steps", type=int, default=None, help="steps of the resume leg (default 8; tiny 4)")
    p.add_argument("--compile", default=None, help="true/false (default: true on CUDA)")
    p.add_argument("--recipe-steps", type=int, default=None,
                   help="steps per recipe in the side-by-side (default 300; tiny 8)")
    p.add_argument("--recipe-eval-windows", type=int, default=None,
                   help="validation windows that score each recipe (default 200; tiny 4)")
    p.add_argument("--data-dir", default="data/owt",
                   help="train.bin / val.bin for the side-by-side (default data/owt, as the presets; without them it "
                        "is skipped)")
    p.add_argument("--ddp-leg", action="store_true", help=argparse.SUPPRESS)  # what each torchrun process runs
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench", "gpu_check.json"))
    return p.parse_args(argv)


def random_sources(cfg, batch_size, loss_fraction):
    source = RandomTokens(cfg.block_size, batch_size, cfg.seed, loss_fraction, documents=DOCUMENTS if loss_fraction
                          else 1)
    return source, {"val": source}


def text_sources(data_dir):
    """Windows of real text, as train.py draws them: the same seed gives every recipe the same batches."""
    def sources(cfg, batch_size, loss_fraction):
        train_windows, val_windows = (TokenWindows(os.path.join(data_dir, f"{split}.bin"), cfg.block_size,
                                                   batch_size, cfg.seed, split_id=i)
                                      for i, split in enumerate(("train", "val")))
        return train_windows, {"val": val_windows}
    return sources


def build(cls, presets, overrides, out):
    cfg = parse_config(cls, [*(os.path.join(ROOT, p) for p in presets), *overrides, f"--out_dir={out}"])
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.num_threads, cfg.backend)
    torch.manual_seed(0)
    return cfg, rt, GPT(GPTConfig(**cfg.model_fields()))


def measure_training(cls, presets, overrides, steps, sources=random_sources, loss_fraction=0.0):
    """Train a fresh model through the real loop for `steps` steps. Speeds are the medians of the
    logged rows after the first (which holds compilation); wall_s includes compilation."""
    out = tempfile.mkdtemp(prefix="gpu_check_")  # removed below: a 162M run's checkpoints are ~2 GB
    # each model compiles afresh, as in its own run: every GPT's graphs share one cache, whose recompile
    # limit (8) could otherwise leave a later model running eager
    torch._dynamo.reset()
    cfg, rt, model = build(cls, presets, [*overrides, "--overwrite", f"--max_iters={steps}",
                                          f"--log_interval={max(1, steps // 6)}", "--eval_iters=1",
                                          f"--eval_interval={10 ** 9}"], out)
    attention = None
    if loss_fraction:  # packed documents: the attention path finetune.py would take here
        attention = "FlexAttention" if choose_attention(model, rt) else "dense document mask"
    memory.reset_peak(rt.device)
    started = time.perf_counter()
    trainer.train(cfg, model, lambda batch_size: sources(cfg, batch_size, loss_fraction), rt)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = list(map(json.loads, f))
    shutil.rmtree(out, ignore_errors=True)
    rows = [r for r in records if r["type"] == "train"][1:]
    plan = [r for r in records if r["type"] == "plan"][0]
    return model, rt, {"tokens_per_step": plan["tokens_per_step"], "steps": steps,
                       "tokens": plan["tokens_per_step"] * steps, "micro_batch": plan["micro_batch"],
                       "accumulation": plan["accumulation"], "batch_tries": plan["batch_tries"],
                       "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
                       "mfu": statistics.median(r["mfu"] for r in rows), "peak_mem_mib": memory.peak_mib(rt.device),
                       "wall_s": time.perf_counter() - started, "dtype": str(rt.dtype).removeprefix("torch."),
                       "compile": cfg.compile, "attention": attention, "plan": rt.plan.line()}


@contextlib.contextmanager
def stopped_after(steps):
    """The loop stops at its `steps`-th logged step as on SIGTERM: a checkpoint, then SystemExit."""
    agreed, seen = trainer.StopFlag.agreed, []
    trainer.StopFlag.agreed = lambda self, rt: seen.append(1) or len(seen) == steps
    try:
        yield
    finally:
        trainer.StopFlag.agreed = agreed


def measure_resume(overrides, steps):
    """`steps` steps straight, against steps // 2, a checkpoint, and a new Run resuming it to `steps`:
    the weights of the two must be equal (on a GPU, where some kernels are not deterministic, close)."""
    half, out = steps // 2, tempfile.mkdtemp(prefix="gpu_check_resume_")
    args = [*overrides, f"--max_iters={steps}", f"--eval_interval={half}", "--eval_iters=1", "--log_interval=1",
            "--compile=false", "--dropout=0.1"]  # the state is the point, not the speed; dropout draws the RNG
    weights = {}
    for name in ("straight", "resumed"):
        folder = os.path.join(out, name)
        with stopped_after(half) if name == "resumed" else contextlib.nullcontext():
            try:
                cfg, rt, model = build(TrainConfig, [PRESET], args, folder)
                trainer.train(cfg, model, lambda batch_size: random_sources(cfg, batch_size, 0.0), rt)
            except SystemExit:
                pass
        if name == "resumed":  # a new model and Run, from the checkpoint
            cfg, rt, model = build(TrainConfig, [PRESET], [*args, "--resume"], folder)
            trainer.train(cfg, model, lambda batch_size: random_sources(cfg, batch_size, 0.0), rt)
        weights[name] = load_checkpoint(os.path.join(folder, "ckpt.pt"))["model"]
    shutil.rmtree(out, ignore_errors=True)
    differences = [(weights["straight"][k].float() - weights["resumed"][k].float()).abs().max().item()
                   for k in weights["straight"]]
    fused = rt.plan.fused_adamw
    return {"steps": steps, "resumed_at": half, "equal": max(differences) == 0.0,
            "max_abs_difference": max(differences), "fused_adamw": fused}


def ddp_leg(args):
    """In each of the torchrun processes: tokens/s of the compiled module around DDP (the trainer's
    wrapping) and of DDP around the compiled module, on the same micro-batches (2 per process, the
    first without the all-reduce)."""
    overrides = [f"--device={args.device}", f"--compile={args.compile}"] + (TINY if args.tiny else [])
    cfg, rt, _ = build(TrainConfig, [PRESET], overrides, tempfile.mkdtemp(prefix="gpu_check_ddp_"))
    batch = 2 if args.tiny else 8
    source = RandomTokens(cfg.block_size, batch, cfg.seed + rt.rank)
    micro = [to_device(source.batch(0, k), rt.device) for k in range(2)]
    result = {"processes": rt.world_size, "micro_batch": batch}
    for order in ("compile(DDP(model))", "DDP(compile(model))"):
        torch._dynamo.reset()
        torch.manual_seed(0)  # a fresh model each time: a DDP wrapper leaves hooks on its parameters
        model = GPT(GPTConfig(**cfg.model_fields())).to(rt.device)
        if order == "compile(DDP(model))":
            wrapped, _ = trainer.wrap_for_training(model, rt, cfg.compile)
        else:
            inner = torch.compile(model) if cfg.compile else model
            wrapped = DDP(inner, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                          gradient_as_bucket_view=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if rt.plan.fused_adamw else {}))
        times = []
        for step in range(8 if not args.tiny else 3):
            synchronize(rt.device)
            started = time.perf_counter()
            for k, (x, y, *_) in enumerate(micro):
                with wrapped.no_sync() if k == 0 else contextlib.nullcontext(), rt.autocast():
                    _, loss = wrapped(x, targets=y)
                    loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(rt.device)
            times.append(time.perf_counter() - started)
        step_s = statistics.median(times[2:] if len(times) > 3 else times[1:])
        result[order] = {"tokens_per_s": rt.world_size * 2 * batch * cfg.block_size / step_s, "step_s": step_s}
    if rt.master:
        write_json(args.out, result)
    torch.distributed.destroy_process_group()


def measure_ddp(args):
    """The ddp leg on every GPU (None with fewer than 2)."""
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    if gpus < 2:
        return None
    out = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", __file__,
           "--ddp-leg", "--device=cuda", f"--compile={args.compile}", f"--out={out}"] + (["--tiny"] if args.tiny else [])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        print(f"ddp leg failed (exit {result.returncode}):\n{result.stderr[-3000:]}", flush=True)
        return {"failed": result.returncode, "stderr": result.stderr[-3000:]}
    with open(out) as f:
        return json.load(f)


@torch.no_grad()
def measure_generation(model, rt, tiny):
    """Beam search (4 beams) and greedy decoding, eager and compiled, on the same prompts: new tokens/s,
    and seconds per decoding step (the prompt's pass, timed alone with one new token, taken out), at
    the largest batch of at most MAX_BATCH_ROWS rows that fits (halved on running out of memory), and
    whether the two give the same tokens."""
    model.eval()
    prompt_len, new, rows = (64, 8, 16) if tiny else (700, 64, MAX_BATCH_ROWS)
    g = torch.Generator().manual_seed(0)
    out = {"prompt_len": prompt_len, "new_tokens": new}
    compiled_step = None  # one compiled step for both searches
    for name, beams in (("beam4", 4), ("greedy", 1)):
        prompts = torch.randint(0, 50257, (rows // beams, prompt_len), generator=g).tolist()

        def decode(batch, new=new):
            if beams > 1:
                return batched_beam_search(model, batch, beams, new, no_repeat_ngram_size=3, stop_tokens=())
            return model.generate(batch, new, stop_tokens=())
        results = {}
        for mode in ("eager", "compiled"):
            model.compiled_decoding = None
            if mode == "compiled" and compiled_step is not None:
                model.compiled_decoding = compiled_step
            elif mode == "compiled":
                compile_decoding(model)
            while True:
                try:
                    with rt.autocast():
                        decode(prompts)  # warm-up, and the compile (greedy has beam search's rows: one graph)
                        synchronize(rt.device)
                        started = time.perf_counter()
                        tokens = decode(prompts)
                        synchronize(rt.device)
                        elapsed = time.perf_counter() - started
                        decode(prompts, 1)  # the prompt's pass, and no decoding step
                        synchronize(rt.device)
                        prompt_pass = time.perf_counter() - started - elapsed
                    break
                except Exception as e:
                    if not memory.is_out_of_memory(e) or len(prompts) == 1:
                        raise
                prompts = prompts[:len(prompts) // 2]
                memory.release(rt.device)
            results[mode] = tokens
            out[f"{name}_{mode}"] = {"prompts": len(prompts), "rows": len(prompts) * beams,
                                     "step_s": max(elapsed - prompt_pass, 0.0) / (new - 1),
                                     "prompt_pass_s": prompt_pass, "tokens_per_s": sum(map(len, tokens)) / elapsed}
        compiled_step = model.compiled_decoding
        out[f"{name}_same_tokens"] = sum(a == b for a, b in zip(results["eager"], results["compiled"]))
        out[f"{name}_prompts"] = len(prompts)
    model.compiled_decoding = None
    return out


def current_card(device, tiny):
    """The runtime.GPUS entry of this GPU (its memory as CUDA reports it), or a stand-in for the CPU."""
    if device.type != "cuda":
        return GPU("CPU stand-in", "cpu", (8, 0), 16.0, 1e12, 50e9)
    props = torch.cuda.get_device_properties(device)
    known = known_gpu(props.name)
    return dataclasses.replace(known or GPU(props.name, props.name, (props.major, props.minor), 0, 0, 0),
                               label=props.name, memory_gib=props.total_memory / 2 ** 30)


def measured_estimates(pre, ft, gen, device, tiny):
    """bench/estimates.py's hours for the gpu and full presets, with this machine's measured rates:
    training at the tokens/s measured (its validation and the prompt forwards at the pretraining's
    FLOP/s), a decoding step as measured for compiled beam search, scaled by its rows."""
    card = current_card(device, tiny)
    model, _ = estimates.fake_model(GPTConfig(**parse_config(TrainConfig, [os.path.join(ROOT, PRESET)]).model_fields()))
    flops_per_s = pre["tokens_per_s"] * model.flops_per_token()
    beam = gen["beam4_compiled"]
    rows = {}
    for preset in ("gpu", "full"):
        _, pipe = estimates.preset_steps(preset)
        rates = estimates.Rates(flops_per_s, lambda r, length: beam["step_s"] * r / beam["rows"], pipe.nproc,
                                {"pretrain": pre["tokens_per_s"], "finetune": ft["tokens_per_s"]})
        row = estimates.estimate(card, preset, rates)
        rows[preset] = {"gpus": pipe.nproc, "hours": row["hours"], "micro_batch": row["micro_batch"]}
    return rows


def compare_recipes(args, overrides):
    """The default recipe and the GPT-2 one (config/gpt2_classic.py) at the 124M shape: the same steps
    on the same batches of real text, each recipe's schedule (WSD; the GPT-2 recipe's cosine) compressed to them,
    then the same validation windows.
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


def report(result):
    pre, ft, gen, res = result["pretrain"], result["finetune"], result["generate"], result["resume"]
    print(f"\n{'':10} {'micro-batch':>12} {'tok/s':>12} {'MFU':>7} {'peak MiB':>9} {'wall s':>7}")
    for label, r in (("pretrain", pre), ("finetune", ft)):
        print(f"{label:10} {r['micro_batch']:>5} x {r['accumulation']:<4} {r['tokens_per_s']:12,.0f} "
              f"{r['mfu'] * 100:6.1f}% {r['peak_mem_mib']:9,.0f} {r['wall_s']:7.0f}")
    print(f"finetune attention: {ft['attention']}")
    print(f"resume: {res['steps']} steps with a checkpoint at {res['resumed_at']}: weights "
          + ("equal" if res["equal"] else f"differ by up to {res['max_abs_difference']:.3g}"))
    for name in ("beam4", "greedy"):
        e, c = gen[f"{name}_eager"], gen[f"{name}_compiled"]
        print(f"generate {name:6} at {e['rows']} rows: eager {e['tokens_per_s']:,.0f} new tok/s ({e['step_s'] * 1e3:.1f} "
              f"ms/step), compiled {c['tokens_per_s']:,.0f} ({c['step_s'] * 1e3:.1f} ms/step), x"
              f"{c['tokens_per_s'] / e['tokens_per_s']:.2f}; same tokens {gen[f'{name}_same_tokens']} of "
              f"{gen[f'{name}_prompts']}")
    if result["ddp"] and "failed" not in result["ddp"]:
        d = result["ddp"]
        a, b = d["compile(DDP(model))"], d["DDP(compile(model))"]
        print(f"ddp on {d['processes']} GPUs: compile(DDP(model)) {a['tokens_per_s']:,.0f} tok/s, DDP(compile(model)) "
              f"{b['tokens_per_s']:,.0f} tok/s, x{a['tokens_per_s'] / b['tokens_per_s']:.2f}")
    print("\nestimated hours per pipeline step (bench/estimates.py's formulas, the rates above):")
    for preset, r in result["estimates_h"].items():
        print(f"  {preset:5} ({r['gpus']} GPU): " + ", ".join(f"{k} {v:.2f}" for k, v in r["hours"].items()))


def main(argv=None):
    args = parse_args(argv)
    args.compile = args.compile or ("true" if args.device.startswith("cuda") else "false")
    if args.ddp_leg:
        return ddp_leg(args)
    overrides = [f"--device={args.device}", f"--compile={args.compile}"] + (TINY if args.tiny else [])
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"gpu_check on {name} (torch {torch.__version__}){' --tiny' if args.tiny else ''}", flush=True)
    steps = args.steps or (12 if args.tiny else 200)
    result = {"device": name, "torch": torch.__version__, "tiny": args.tiny}
    model, rt, result["pretrain"] = measure_training(TrainConfig, [PRESET], overrides + ["--warmup_iters=10"], steps)
    write_json(args.out, result)
    # a real finetune takes the pretrained checkpoint's architecture, not FinetuneConfig's defaults
    architecture = [f"--{k}={v}" for k, v in dataclasses.asdict(model.config).items()]
    _, _, result["finetune"] = measure_training(FinetuneConfig, ["config/finetune_gpu.py"],
                                                architecture + overrides + ["--init_from=", "--warmup_iters=10"],
                                                steps, loss_fraction=LOSS_FRACTION)
    write_json(args.out, result)
    resume = [f"--device={args.device}"] + (TINY if args.tiny else []) + ["--batch_size=2", "--tokens_per_step=0",
                                                                          "--gradient_accumulation_steps=2"]
    result["resume"] = measure_resume(resume, args.resume_steps or (4 if args.tiny else 8))
    result["ddp"] = measure_ddp(args)
    write_json(args.out, result)
    result["generate"] = measure_generation(model, rt, args.tiny)
    result["estimates_h"] = measured_estimates(result["pretrain"], result["finetune"], result["generate"], rt.device,
                                               args.tiny)
    report(result)
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
