"""What a GPU run takes, exercised on a CPU: the CUDA device setup (with torch.cuda patched), batch
placement, the KV cache's dtype under autocast, one host sync per logged step, a compiled model
without graph breaks, bf16 autocast and fp16 with the GradScaler. tests/test_cuda.py runs the
real thing where CUDA exists."""
import json
import math
import os
import runpy
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import runtime
import train
import trainer
from data import loss_positions, to_device
from model import GPT, GPTConfig, KVCache

from conftest import ROOT, TINY


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32, **kw))


def pretend_gpu(monkeypatch, name="NVIDIA A100-SXM4-80GB", capability=(8, 0), gib=79.15, triton=True):
    """torch.cuda acting like one GPU of this kind, on the CPU; returns the devices set_device was given
    (it rejects a bare "cuda" device, as the real one does, checked before CUDA is touched)."""
    chosen = []

    def set_device(device):
        if torch.device(device).index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        chosen.append(torch.device(device))

    card = SimpleNamespace(name=name, major=capability[0], minor=capability[1], total_memory=int(gib * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: card)  # capability and name too
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    monkeypatch.setattr(runtime, "has_triton", lambda: triton)
    return chosen


def test_a_single_gpu_gets_an_indexed_device(monkeypatch):
    chosen = pretend_gpu(monkeypatch)
    for name in ("auto", "cuda"):
        rt = runtime.setup_runtime(name)
        assert rt.device == torch.device("cuda:0") and rt.dtype == torch.bfloat16
    assert chosen == [torch.device("cuda:0")] * 2
    # a GPU with only emulated bf16 (V100, T4) gets fp16, which the GradScaler then guards
    pretend_gpu(monkeypatch, "Tesla V100-SXM2-16GB", (7, 0))
    assert runtime.setup_runtime("cuda").dtype == torch.float16
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert runtime.pick_device("cuda", local_rank=3) == torch.device("cuda:3")


# the cards users run the GPU presets on: (device name, capability, dtype=auto, FlexAttention, SDPA backends)
CARDS = [("Tesla V100-SXM2-16GB", (7, 0), torch.float16, False, "mem-efficient/math"),
         ("Tesla T4", (7, 5), torch.float16, False, "mem-efficient/math"),
         ("NVIDIA A100-SXM4-40GB", (8, 0), torch.bfloat16, True, "flash/mem-efficient/math"),
         ("NVIDIA A10G", (8, 6), torch.bfloat16, True, "flash/mem-efficient/math"),
         ("NVIDIA L4", (8, 9), torch.bfloat16, True, "flash/mem-efficient/math"),
         ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16, True, "cuDNN/flash/mem-efficient/math")]


@pytest.mark.parametrize("name,capability,dtype,flex,sdpa", CARDS, ids=[f"sm{c[0]}{c[1]}" for _, c, *_ in CARDS])
def test_each_card_gets_its_dtype_attention_path_and_compile_decision(monkeypatch, capsys, name, capability, dtype,
                                                                      flex, sdpa):
    """From the compute capability: native bf16 from sm80, else fp16 with loss scaling; FlexAttention
    for packed finetuning from sm80 (its Triton kernel is not built for older cards), else the dense
    document mask; torch.compile from sm70; fused AdamW. One line says so at startup."""
    pretend_gpu(monkeypatch, name, capability, gib=22.19)
    rt = runtime.setup_runtime("cuda")
    assert rt.dtype == dtype and rt.plan.flex_attention == flex and rt.plan.compile and rt.plan.fused_adamw
    words = "bfloat16" if dtype == torch.bfloat16 else "float16 with loss scaling"
    attention = ("FlexAttention for packed finetuning" if flex
                 else "dense document mask for packed finetuning (FlexAttention needs sm80+)")
    sm = f"sm{capability[0]}{capability[1]}"
    assert capsys.readouterr().out == (f"{name} ({sm}, 22.2 GiB): {words}, {attention}, torch.compile, fused AdamW, "
                                       f"SDPA {sdpa}\n")
    # the FlexAttention probe runs only where the rules allow FlexAttention, at the model's head size
    probed = []
    monkeypatch.setattr(runtime, "flex_attention_failure", lambda *args: probed.append(args))
    model = tiny()
    assert runtime.choose_attention(model, rt) == flex and model.use_flex_attention == flex
    assert probed == ([(torch.device("cuda:0"), dtype, 16)] if flex else [])


def test_bfloat16_asked_for_on_a_card_without_it_is_kept_with_a_warning_and_runs_eager(monkeypatch, capsys):
    """An explicit dtype wins, but bf16 before sm80 is emulated: slow matmuls, no fused SDPA kernel, and
    Triton cannot compile it, so the run goes eager instead of failing in ptxas at the first step."""
    pretend_gpu(monkeypatch, "Tesla T4", (7, 5), gib=14.75)
    rt = runtime.setup_runtime("cuda", dtype="bfloat16")
    out = capsys.readouterr().out.splitlines()
    assert rt.dtype == torch.bfloat16 and not rt.plan.compile and not rt.plan.flex_attention
    assert out[0] == ("Tesla T4 (sm75, 14.8 GiB): bfloat16 (emulated), dense document mask for packed finetuning "
                      "(FlexAttention needs sm80+), eager (Triton cannot compile bfloat16 before sm80), fused AdamW, "
                      "SDPA math")
    assert len(out) == 2 and out[1].startswith("warning: dtype=bfloat16 on Tesla T4 (sm75) is emulated")
    assert "dtype=auto picks float16" in out[1]

    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile must not be tried")
    monkeypatch.setattr(torch, "compile", no_compile)
    model = tiny()
    assert runtime.maybe_compile(model, True, rt) is model
    assert "running eager, Triton cannot compile bfloat16 before sm80" in capsys.readouterr().out


def test_without_triton_a_gpu_trains_eager_with_the_dense_mask(monkeypatch, capsys):
    pretend_gpu(monkeypatch, triton=False)
    rt = runtime.setup_runtime("cuda")
    assert not rt.plan.compile and not rt.plan.flex_attention
    assert ("dense document mask for packed finetuning (Triton is not installed (pip install triton)), "
            "eager (Triton is not installed") in capsys.readouterr().out


def test_a_failed_flexattention_probe_falls_back_to_the_dense_mask_with_a_line(monkeypatch, capsys):
    """The probe is real: FlexAttention compiled on the CPU has no backward, which it reports in one line."""
    failure = runtime.flex_attention_failure(torch.device("cpu"), torch.float32, 16)
    assert failure.startswith("FlexAttention failed a probe (") and "backward" in failure and "\n" not in failure
    pretend_gpu(monkeypatch)
    rt = runtime.setup_runtime("cuda")
    capsys.readouterr()
    monkeypatch.setattr(runtime, "flex_attention_failure", lambda *args: failure)
    model = tiny()
    assert runtime.choose_attention(model, rt) is False and model.use_flex_attention is False
    assert capsys.readouterr().out == f"packed finetuning: the dense document mask, {failure}\n"
    assert f"dense document mask for packed finetuning ({failure})" in rt.plan.line()


def test_the_model_takes_the_attention_path_it_is_told_for_packed_documents(monkeypatch):
    """GPT.use_flex_attention reaches document_mask: FlexAttention's block mask or the dense mask, the
    same loss either way (FlexAttention runs forward only on the CPU); None keeps the CUDA-or-not default."""
    import model as model_module
    asked = []
    real = model_module.document_mask
    monkeypatch.setattr(model_module, "document_mask", lambda positions, flex=None: asked.append(flex) or real(
        positions, flex))
    model = tiny(pos_emb="rope").eval()
    x = torch.randint(0, 512, (2, 16))
    positions = torch.tensor([list(range(10)) + list(range(6)), list(range(16))])
    losses = []
    for flex in (True, False, None):
        model.use_flex_attention = flex
        with torch.no_grad():
            losses.append(model(x, targets=x, positions=positions)[1].item())
    assert asked == [True, False, None]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5) and losses[2] == losses[1]


def test_batches_follow_the_model_to_any_device():
    batch = (torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), None, None)
    moved = to_device(batch, torch.device("meta"))  # stands in for mps: any device that is not the CPU
    assert moved[0].device.type == moved[1].device.type == "meta" and moved[2] is None


def test_kv_cache_holds_the_autocast_dtype_and_matches_uncached_generation():
    model = tiny(pos_emb="rope", qk_norm=True).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    assert KVCache(model.config, 1, 8, "cpu").k.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert KVCache(model.config, 1, 8, "cpu").k.dtype == torch.bfloat16
        cached = model.generate(prompts, 10, use_cache=True)
        uncached = model.generate(prompts, 10, use_cache=False)
    assert cached == uncached


def test_the_loss_index_keeps_a_compiled_forward_in_one_graph():
    model = tiny()
    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    mask = np.zeros((2, 16), dtype=bool)
    mask[:, 10:] = True
    rows, weights = loss_positions(mask, bucket=8)
    explained = torch._dynamo.explain(model)(x, targets=y, loss_rows=rows, loss_weights=weights)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    explained = torch._dynamo.explain(model)(x, targets=y)
    assert explained.graph_break_count == 0


def test_training_syncs_with_the_host_only_at_logged_steps(corpus, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer.StopFlag, "agreed", lambda self, rt: calls.append(1) or False)
    train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o", "--max_iters=10", "--log_interval=5"])
    assert len(calls) == 2  # steps 5 and 10, not every step


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_training_runs_and_learns(corpus, dtype):
    """bf16 autocast, and fp16 autocast with the GradScaler, as on GPUs (here on the CPU), with the
    default recipe (Muon + AdamW): they learn as much as float32 does on the same batches."""
    def final_val(dtype):
        return train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={corpus / dtype}", "--max_iters=20",
                                  "--eval_interval=20", "--learning_rate=1e-2", f"--dtype={dtype}"])["val"]
    reference, mixed = final_val("float32"), final_val(dtype)
    ckpt = torch.load(corpus / dtype / "ckpt.pt", weights_only=False)
    assert ckpt["config"]["dtype"] == dtype and ckpt["model"]["wte.weight"].dtype == torch.float32
    assert reference < 6.0  # from 10.8: the run learns
    assert np.isfinite(mixed) and abs(mixed - reference) < 0.05
    if dtype == "float16":
        assert ckpt["scaler"]["scale"] > 0  # the scaler ran and was saved for --resume


def test_compiled_pretraining_and_finetuning_steps():
    """torch.compile (inductor, on the CPU here) trains on both kinds of batch like the eager model."""
    eager, compiled = tiny(), tiny()
    step = torch.compile(compiled)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled)]
    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    mask = np.zeros((2, 16), dtype=bool)
    mask[:, 9:] = True
    rows, weights = loss_positions(mask, bucket=32)
    for kwargs in ({}, {"loss_rows": rows, "loss_weights": weights}):  # pretraining, then finetuning
        losses = []
        for model, opt in zip((eager, step), opts):
            _, loss = model(x, targets=y, **kwargs)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(eager.parameters(), compiled.parameters()))


def test_compile_runs_where_it_can_and_falls_back_to_eager_with_a_line_where_it_cannot(monkeypatch, capsys):
    """The CPU preset compiles by default: a laptop without a C++ compiler, or a Mac on MPS, trains
    eager and is told why, instead of dying on the first step."""
    rt = runtime.Runtime(torch.device("cpu"))
    model = tiny()
    assert runtime.maybe_compile(model, False, rt) is model
    assert isinstance(runtime.maybe_compile(model, True, rt), torch._dynamo.eval_frame.OptimizedModule)
    monkeypatch.setenv("CXX", "no-such-compiler++")
    assert runtime.maybe_compile(model, True, rt) is model
    line = capsys.readouterr().out
    assert "running eager" in line and "no-such-compiler++" in line
    monkeypatch.delenv("CXX")

    def broken_compile(fn):  # a compiler that is there but cannot build (no omp.h, no Python.h)
        def run(*args):
            raise RuntimeError("fatal error: omp.h: No such file or directory\ncompilation terminated.")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    assert runtime.maybe_compile(model, True, rt) is model
    assert "failed on a probe (RuntimeError: fatal error: omp.h" in capsys.readouterr().out
    assert "prototype" in runtime.compile_blocker(torch.device("mps"))


def test_gpu_check_runs_its_tiny_cpu_stand_in(tmp_path, corpus):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--steps", "6",
                             "--data-dir", str(corpus), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    for phase in ("pretrain", "finetune"):
        assert report[phase]["tokens_per_s"] > 0 and report[phase]["mfu"] > 0
        assert report[phase]["micro_batch"] * report[phase]["accumulation"] * 128 == report[phase]["tokens_per_step"]
    # finetuning took the packed path (documents with their positions): on the CPU the dense document mask
    assert report["finetune"]["attention"] == "dense document mask" and report["pretrain"]["attention"] is None
    assert report["resume"]["equal"] and report["resume"]["resumed_at"] == 2  # a reloaded Run goes on exactly
    gen = report["generate"]
    for name in ("beam4", "greedy"):
        assert gen[f"{name}_eager"]["tokens_per_s"] > 0 and gen[f"{name}_compiled"]["tokens_per_s"] > 0
        assert gen[f"{name}_same_tokens"] == gen[f"{name}_prompts"]  # compiled decoding gives eager's tokens
    for preset, gpus in (("gpu", 1), ("full", 8)):  # every step the pipeline runs, its evaluations included
        hours = report["estimates_h"][preset]["hours"]
        assert report["estimates_h"][preset]["gpus"] == gpus and all(h > 0 for h in hours.values())
        assert {"pretrain", "finetune", "evaluate", "evaluate_pretrained_0shot", "evaluate_pretrained_3shot"} < set(hours)
    assert report["ddp"] is None  # one CPU: the ddp leg needs 2 GPUs (its CPU stand-in: below)
    assert "estimated hours per pipeline step" in result.stdout
    # the two recipes trained on the same real text for the same tokens, and were scored on the same windows
    default, classic = report["recipes"]["default"], report["recipes"]["classic"]
    assert default["tokens"] == classic["tokens"] == default["steps"] * default["tokens_per_step"] > 0
    assert default["val_windows"] == classic["val_windows"] > 0
    assert all(math.isfinite(r["val_loss"]) and r["val_loss"] < math.log(50257) for r in (default, classic))
    assert report["recipes"]["difference"] == pytest.approx(default["val_loss"] - classic["val_loss"])
    assert "default - classic" in result.stdout


def test_gpu_check_ddp_leg_times_both_wrapping_orders_on_two_processes(tmp_path):
    """What gpu_check runs on every GPU when there are 2 or more, here on 2 CPU processes (gloo, eager:
    without compile the two orders are the same module, so this proves the plumbing, not the gain)."""
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "bench/gpu_check.py",
           "--ddp-leg", "--device=cpu", "--tiny", "--compile=false", f"--out={out}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["processes"] == 2
    assert all(report[order]["tokens_per_s"] > 0 for order in ("compile(DDP(model))", "DDP(compile(model))"))


def test_gpu_check_skips_the_recipe_side_by_side_without_data(tmp_path, capsys):
    gpu_check = runpy.run_path(str(ROOT / "bench" / "gpu_check.py"))
    args = gpu_check["parse_args"](["--device", "cpu", "--tiny", "--data-dir", str(tmp_path / "missing")])
    assert gpu_check["compare_recipes"](args, []) is None
    assert "recipe side-by-side skipped" in capsys.readouterr().out
