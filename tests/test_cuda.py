"""On a machine with CUDA (skipped elsewhere): the smoke pipeline on the GPU with bf16 and
torch.compile, the KV cache against full recomputation, compiled decoding (with and without CUDA
graphs) against eager and with one host sync a step, a compiled finetuning step with no host
sync, batches pinned off the training thread, the device plan and the FlexAttention probe on this
card, batch_size=auto measuring its memory, and with two or more GPUs a 2-process torchrun on NCCL
(on the default recipe, Muon's sharded step included) and evaluation on two GPUs. Then the GPU
check; bench/gpu_session.sh runs both as one prepared script (README, "Performance").
"""
import copy
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from data import Prefetcher, RandomTokens, loss_positions
from generation import batched_beam_search, compile_decoding, constrained_span_decode
from model import GPT, GPTConfig

from conftest import ROOT, TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda:0")


def small(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=256, n_layer=2, n_head=4, n_embd=128, **kw)).to(CUDA)


def test_smoke_pipeline_on_the_gpu_with_bf16_and_compile(tmp_path, shared_data):
    gpu = "--device=cuda --dtype=bfloat16 --compile=true"
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "--preset", "smoke", "--data-root", str(shared_data), "--",
           f"--pretrain_args={gpu}", f"--finetune_args={gpu}", "--eval_args=--device=cuda --dtype=bfloat16"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "smoke" / "eval" / "squad_validation_metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and metrics["dtype"] == "bfloat16"
    assert (tmp_path / "out" / "smoke" / "REPORT.md").is_file()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_relu2_hidden_activations_stay_in_the_autocast_dtype(dtype):
    """CUDA's autocast computes pow in float32: a squared hidden layer must not become a float32 copy."""
    model, seen = small(mlp="relu2"), []
    model.blocks[0].mlp.c_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cuda", dtype=dtype):
        model(torch.zeros(2, 16, dtype=torch.long, device=CUDA))
    assert seen == [dtype]


@pytest.mark.parametrize("arch", [{}, {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True}])
def test_cached_generation_equals_recomputation(arch):
    model = small(**arch).eval()
    prompts = [list(range(1, 40)), [5, 6, 7]]
    assert model.generate(prompts, 20, use_cache=True) == model.generate(prompts, 20, use_cache=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # different GEMM shapes round differently: a
        cached, full = (model.generate(prompts, 5, use_cache=c) for c in (True, False))  # near-tie may flip late
    assert cached == full


def host_syncs(decode):
    """How many times decode() made the host wait for the GPU."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            decode()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.parametrize("mode", ["eager", "compiled", "cuda_graphs"])
def test_decoding_equals_eager_and_syncs_once_a_step(mode):
    eager = small().eval()
    model = eager if mode == "eager" else compile_decoding(copy.deepcopy(eager), cuda_graphs=mode == "cuda_graphs")
    prompts = [list(range(1, 40)), [5, 6, 7], list(range(300, 320)), [9]]
    assert model.generate(prompts, 24, stop_tokens=()) == eager.generate(prompts, 24, stop_tokens=())
    beams = [batched_beam_search(m, prompts, 4, 24, no_repeat_ngram_size=3) for m in (model, eager)]
    assert beams[0] == beams[1]
    spans = [constrained_span_decode(m, prompts, prompts, 12) for m in (model, eager)]
    assert spans[0] == spans[1]
    for decode in (lambda n: model.generate(prompts, n, stop_tokens=()),  # no stop: every run takes n steps
                   lambda n: batched_beam_search(model, prompts, 4, n, stop_tokens=())):
        assert host_syncs(lambda: decode(24)) - host_syncs(lambda: decode(12)) <= 12


def test_compiled_finetuning_step_never_waits_for_the_host():
    model = torch.compile(small())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x, y = (torch.randint(0, 50257, (4, 256), device=CUDA) for _ in range(2))
    mask = np.zeros((4, 256), dtype=bool)
    mask[:, 200:] = True
    rows, weights = (t.to(CUDA) for t in loss_positions(mask))
    for step in range(3):  # the first steps compile; the last runs with syncs forbidden
        if step == 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(x, targets=y, loss_rows=rows, loss_weights=weights)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


RECIPES = {"gpt2": {}, "default": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True,
                                       tie_embeddings=False, bias=False)}


@pytest.mark.parametrize("recipe", RECIPES)
def test_compiled_step_on_packed_documents_uses_flex_attention(recipe):
    """Finetuning rows pack several examples; each attends only to itself (FlexAttention block mask).
    With QK-norm, q and k leave autocast's fp32 rms_norm in v's dtype, as FlexAttention needs."""
    eager = small(**RECIPES[recipe])
    compiled = torch.compile(small(**RECIPES[recipe]))
    x, y = (torch.randint(0, 50257, (2, 256), device=CUDA) for _ in range(2))
    positions = torch.cat([torch.arange(100), torch.arange(156)]).repeat(2, 1).to(CUDA)  # two documents a row
    mask = np.ones((2, 256), dtype=bool)
    rows, weights = (t.to(CUDA) for t in loss_positions(mask))
    losses = []
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, targets=y, loss_rows=rows, loss_weights=weights, positions=positions)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


def test_batches_are_pinned_on_the_prefetch_thread():
    fetch = Prefetcher(RandomTokens(64, 2, seed=0), CUDA, [(0, 0), (1, 0)])
    queued = fetch.queue.get()  # what the worker thread prepared
    assert all(t.is_pinned() and t.is_contiguous() for t in queued if t is not None)
    x, *_ = fetch.next()
    assert x.device == CUDA


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_on_nccl_keeps_two_gpus_in_sync(corpus):  # the default recipe, Muon included
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
           f"--data_dir={corpus}", f"--out_dir={corpus}/ddp", "--max_iters=6", "--gradient_accumulation_steps=2",
           "--device=cuda", "--backend=nccl", "--pos_emb=rope", "--norm=rmsnorm", "--mlp=swiglu", "--qk_norm=true",
           "--tie_embeddings=false", "--bias=false", "--optimizer=muon", "--eval_iters=1", "--eval_interval=3"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(corpus / "ddp" / "metrics.jsonl") as f:
        ranks = [r for r in map(json.loads, f) if r["type"] == "ranks"][0]["ranks"]
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"] and ranks[0]["weights"] == ranks[1]["weights"]


def test_the_device_plan_is_this_cards_and_flex_attention_passes_its_probe_from_sm80():
    """runtime's rules (tested for sm70-sm90 with torch.cuda patched) on the real card."""
    import runtime
    rt = runtime.setup_runtime("cuda")
    capability = torch.cuda.get_device_capability(CUDA)
    assert rt.dtype == (torch.bfloat16 if capability >= (8, 0) else torch.float16)
    assert rt.plan.line().startswith(torch.cuda.get_device_name(CUDA)) and rt.plan.fused_adamw
    uses_flex = runtime.choose_attention(GPT(GPTConfig(block_size=256, n_layer=2, n_head=4, n_embd=256)).to(CUDA), rt)
    assert uses_flex == (capability >= (8, 0))


def test_batch_size_auto_measures_this_gpus_memory(corpus):
    """The probe's tries run on the card and report their peak memory; the tokens per step stay."""
    import train
    out = corpus / "auto"
    train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={out}", "--max_iters=3", "--device=cuda",
                       "--batch_size=auto", "--tokens_per_step=2048"])  # 64 sequences of 32 tokens
    with open(out / "metrics.jsonl") as f:
        plan = [r for r in map(json.loads, f) if r["type"] == "plan"][0]
    assert plan["batch_chosen_by"] == "memory probe" and plan["micro_batch"] * plan["accumulation"] == 64
    assert all(peak is not None and peak > 0 for _, peak, fitted in plan["batch_tries"] if fitted)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_evaluate_the_web_text_loss_of_one(tmp_path, corpus):
    """evaluate.py under torchrun on NCCL: the same loss, to the bit, as one process."""
    import train
    train.main(TINY + [f"--data_dir={corpus}", f"--out_dir={tmp_path / 'run'}", "--max_iters=2", "--device=cuda"])
    args = ["evaluate.py", "--task=owt", f"--ckpt={tmp_path / 'run' / 'ckpt.pt'}", f"--owt-bin={corpus / 'val.bin'}"]
    losses = []
    for launch, out in (([sys.executable], "one"), ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node=2"], "two")):
        result = subprocess.run(launch + args + [f"--out={tmp_path / out}"], cwd=ROOT, capture_output=True, text=True,
                                timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        losses.append(json.loads((tmp_path / out / "owt_val_metrics.json").read_text())["scores"]["loss"])
    assert losses[0] == losses[1]
