"""Which GPU: per-card ESTIMATES for `python pipeline.py --preset gpu`, from formulas; no GPU has
confirmed any of them.

    python bench/estimates.py                 # the README's table, as Markdown
    python bench/estimates.py --cards all     # every card of runtime.GPUS
    python bench/estimates.py --json          # every figure

For each card: what runtime.py picks there (cuda_plan: dtype=auto, the attention path of packed
finetuning), the micro-batch that fits pretraining and finetuning, and the hours of each GPU step of
the pipeline, read from the steps pipeline.build_steps makes for the preset (their configs and
evaluate.py arguments), so a changed preset changes the table.

Memory of a training micro-batch of b sequences (card's dtype, eager):
  fp32 weights + fp32 gradients + optimizer state (AdamW 2 floats per parameter it owns, Muon 1)
  + what autograd saves for backward, MEASURED on the CPU: the preset's model runs one training
    forward under CPU autocast in the card's dtype on fake tensors (FakeTensorMode: the same graph and
    saved tensors, no arithmetic, so the 162M model takes a second), storages counted once; 1 and 2
    sequences give the bytes per sequence and the fixed part (the weights' autocast copies)
  + the loss's backward transient: 8 bytes per logit (the fp32 gradients of the log-softmax output and
    of its input, alive together) for the positions that go through the output layer (all in
    pretraining, LOSS_FRACTION in finetuning)
and it fits when that stays under memory.MARGIN of the card less CUDA_CONTEXT_GIB (memory.budget's
rule). The micro-batch is the largest divisor of the step's sequences that fits. torch.compile
usually saves less (it recomputes pointwise ops), so compiled runs may fit more.

Hours: training FLOPs (model.flops_per_token, the output layer only at loss positions in
finetuning, plus the periodic validation forwards) over the card's peak times an ASSUMED MFU. Decoding:
each beam-search step reads the bf16/fp16 weights and the KV cache of every row (prompts x beams,
evaluate.py's batch) at BANDWIDTH_EFFICIENCY of the card's bandwidth, or takes STEP_OVERHEAD_S of
eager launches, whichever is longer; each batch runs the task's max_new_tokens steps (an upper bound:
a batch ends once all its beams have), after a prompt forward at the MFU. Data preparation (CPU and
network) is not counted.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import pipeline  # noqa: E402
import tasks  # noqa: E402
from common import UserError, run_main  # noqa: E402
from config import FinetuneConfig, TrainConfig, parse_config  # noqa: E402
from memory import MARGIN  # noqa: E402
from plan import configured_tokens_per_step  # noqa: E402
from scoring import GPT2_SUMMARY, MAX_BATCH_ROWS  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from runtime import GPUS, cuda_plan, native_bf16  # noqa: E402

PRESET = "gpu"
README_CARDS = ("T4", "A10G", "L4", "V100 16GB", "V100 32GB", "A100 40GB", "A100 80GB", "H100")
# ASSUMED model FLOPs utilization of training (and of prompt forwards), per card: guesses for a
# 162M-parameter, 768-wide model with torch.compile, to be replaced by bench/gpu_check.py's
# measurements. Small widths leave big cards idle (modded-nanogpt's GPT-2-small runs are near 30% on
# H100); the T4 and L4 throttle at their 70-72 W cap (a public T4 measurement: ~21 TFLOP/s on a 4096^3
# fp16 matmul, 32% of peak) and the pre-Ampere cards have no flash attention.
MFU = {"H200": 0.30, "H100 PCIe": 0.30, "H100": 0.30, "A100 80GB": 0.40, "A100 40GB": 0.40, "L40S": 0.35, "L40": 0.35,
       "L4": 0.30, "A10G": 0.40, "RTX 4090": 0.35, "RTX 3090": 0.40, "V100 32GB": 0.30, "V100 16GB": 0.30,
       "T4": 0.20}
BANDWIDTH_EFFICIENCY = 0.7  # share of the datasheet bandwidth a streaming read achieves
# a beam-search step of this model is 1,296 aten ops (counted with a TorchDispatchMode over
# generation.batched_beam_search at the preset's 12 layers), at ~4 us of eager dispatch and launch each
STEP_OVERHEAD_S = 5e-3
# ASSUMED for a compiled step (evaluate.py's default on CUDA): inductor fuses the model's step into ~10
# kernels a layer (~130 launches) and the beam search's bookkeeping stays eager (~100 ops): ~1.5 ms
COMPILED_STEP_OVERHEAD_S = 1.5e-3
CUDA_CONTEXT_GIB = 0.6  # CUDA context and cuBLAS workspaces: held by no tensor, so outside the budget
LOSS_FRACTION = 0.12  # finetuning positions that carry loss (the README's CPU run: 11.3%)
LOSS_TRANSIENT_BYTES = 8  # per logit in the loss's backward (above)
LOGIT_PASSES = 4  # fp32 passes over a decoding step's logits: cast, log-softmax read and write, top-k
# examples per split (the hub's full test/dev splits, which the pipeline scores)
EXAMPLES = {"cnn_dailymail": 11490, "squad": 10570, "sst2": 872}
# mean padded prompt length of evaluate.py's batches (16 prompts, longest first), by task and shots
# (None: the finetuning prompt), measured on ../shared/data (10,000 CNN/DM test, 8,981 SQuAD and 872
# SST-2 validation examples) with fewshot.build_prompts at block size 1024
PROMPT_TOKENS = {("cnn_dailymail", None): 692, ("cnn_dailymail", 0): 685, ("cnn_dailymail", 3): 804,
                 ("squad", None): 199, ("squad", 0): 199, ("squad", 3): 724,
                 ("sst2", None): 43, ("sst2", 0): 43, ("sst2", 3): 177}


def auto_dtype(gpu):
    return torch.bfloat16 if native_bf16(gpu.capability) else torch.float16


def preset_steps(preset=PRESET):
    """The pipeline's steps for the preset, as pipeline.py builds them: {name: argv after the script}."""
    cfg = parse_config(pipeline.PipelineConfig, [pipeline.in_repo(os.path.join("config", f"pipeline_{preset}.py"))])
    def after_script(command):  # python [-m torch.distributed.run ...] script.py argv...
        return command[next(i for i, arg in enumerate(command) if arg.endswith(".py")) + 1:]
    return {step.name: after_script(step.command) for step in pipeline.build_steps(cfg, None)}, cfg


def fake_model(config):
    """The model of a GPTConfig (or its fields) on fake tensors: no memory, no arithmetic."""
    fields = config if isinstance(config, dict) else dataclasses.asdict(config)
    return _fake_model(tuple(sorted(fields.items())))


@functools.cache
def _fake_model(fields):
    with FakeTensorMode() as mode:
        return GPT(GPTConfig(**dict(fields))), mode


def saved_bytes(config, dtype, batch, loss_fraction=None):
    """Bytes autograd saves for backward in one training forward of `batch` sequences of the model of
    `config` under CPU autocast in `dtype`: the real graph on fake tensors. loss_fraction: a packed
    finetuning batch (documents' positions; only that share of them through the output layer).
    Parameters are not counted (they are the weights)."""
    model, mode = fake_model(config)
    T = model.config.block_size
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    storages = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:  # views share a storage: each counts once
            storages[storage._cdata] = storage.nbytes()
        return t

    with mode:
        x = torch.zeros(batch, T, dtype=torch.long)
        kwargs = {}
        if loss_fraction is not None:
            rows = round(loss_fraction * batch * T)
            kwargs = dict(positions=(torch.arange(T) % 256).expand(batch, T), loss_rows=torch.arange(rows),
                          loss_weights=torch.full((rows,), 1 / rows))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=dtype):
            model(x, targets=x, **kwargs)
    return sum(storages.values())


def activation_bytes(config, dtype, loss_fraction=None):
    """(bytes per sequence, fixed bytes) that a training forward keeps for backward, from measurements
    at 1 and 2 sequences."""
    return _activation_bytes(tuple(sorted(dataclasses.asdict(config).items())), dtype, loss_fraction)


@functools.cache
def _activation_bytes(fields, dtype, loss_fraction):
    one, two = (saved_bytes(dict(fields), dtype, b, loss_fraction) for b in (1, 2))
    return two - one, 2 * one - two


def state_bytes(model, optimizer):
    """fp32 weights, gradients and optimizer state: trainer.build_optimizers' split (Muon for the
    hidden matrices, AdamW for embeddings, head and vectors; or AdamW for all)."""
    embeds = {id(model.wte.weight), id(model.lm_head.weight)} | ({id(model.wpe.weight)} if model.wpe else set())
    params = list(model.parameters())
    hidden = sum(p.numel() for p in params if p.dim() == 2 and id(p) not in embeds) if optimizer == "muon" else 0
    total = sum(p.numel() for p in params)
    return 4 * (2 * total + hidden + 2 * (total - hidden))


@dataclasses.dataclass
class Training:
    """A training step of the pipeline, as its config says."""
    name: str
    cfg: object
    loss_fraction: float = None  # None: every position carries loss (pretraining)
    eval_sources: int = 1  # validation sources scored at each evaluation

    @property
    def sequences_per_step(self):
        return configured_tokens_per_step(self.cfg) // self.cfg.block_size


def training_steps(steps):
    pre = parse_config(TrainConfig, steps["pretrain"])
    ft = parse_config(FinetuneConfig, steps["finetune"])
    for key, value in pre.model_fields().items():  # finetuning takes the pretrained architecture
        setattr(ft, key, value)
    return [Training("pretrain", pre), Training("finetune", ft, LOSS_FRACTION, len(tasks.task_list(ft.tasks)))]


def micro_batch(gpu, model, run, dtype, gpus=1):
    """The largest divisor of a process's share of the step's sequences whose estimated peak (static +
    b * per_sequence bytes) stays under the budget, 0 when not even one sequence fits; and those three
    figures."""
    activations, fixed = activation_bytes(model.config, dtype, run.loss_fraction)
    logits = model.config.block_size * (run.loss_fraction or 1.0) * model.config.vocab_size
    per_seq = activations + LOSS_TRANSIENT_BYTES * logits
    static = state_bytes(model, run.cfg.optimizer) + fixed
    budget = MARGIN * (gpu.memory_gib - CUDA_CONTEXT_GIB) * 2 ** 30
    n = run.sequences_per_step // gpus
    sizes = [b for b in range(1, n + 1) if n % b == 0]
    fitting = [b for b in sizes if static + b * per_seq <= budget]
    return (max(fitting) if fitting else 0), {"activations": activations, "per_sequence": per_seq, "static": static,
                                              "budget": budget}


@dataclasses.dataclass
class Rates:
    """How fast a card runs the pipeline's steps: from its datasheet and the assumptions above
    (card_rates), or measured on it by bench/gpu_check.py, which then uses the same formulas."""
    flops_per_s: float  # achieved FLOP/s of training and of prompt forwards, per GPU
    decode_step_s: object  # (rows, positions attended) -> seconds of one decoding step
    gpus: int = 1  # processes of the training and evaluation steps (torchrun); linear scaling assumed
    tokens_per_s: dict = dataclasses.field(default_factory=dict)  # training step -> measured tokens/s per GPU


def card_rates(gpu, model, gpus=1, compiled=True):
    """The Rates of a card from its datasheet: training at the ASSUMED MFU; a decoding step reads the
    weights (autocast's cached copies), the KV cache of every row and the fp32 logits at
    BANDWIDTH_EFFICIENCY of the bandwidth, or takes the launch overhead of an (eager or compiled)
    step, whichever is longer."""
    c, itemsize = model.config, torch.finfo(auto_dtype(gpu)).bits // 8
    weights = (model.num_params() - model.wte.weight.numel()) * itemsize

    def decode_step_s(rows, length):
        read = weights + c.n_layer * 2 * rows * length * c.n_embd * itemsize + rows * c.vocab_size * 4 * LOGIT_PASSES
        return max(read / (gpu.bandwidth * BANDWIDTH_EFFICIENCY), COMPILED_STEP_OVERHEAD_S if compiled else
                   STEP_OVERHEAD_S)
    return Rates(gpu.peak_flops * MFU[gpu.label], decode_step_s, gpus)


def training_hours(rates, model, run, micro_batch):
    """Training plus its periodic validation (forward only: a third of the training FLOPs; its batches
    are micro-batches), over all the processes."""
    cfg, T = run.cfg, run.cfg.block_size
    flops_token = model.flops_per_token(T, run.loss_fraction or 1.0)
    tokens = cfg.max_iters * run.sequences_per_step * T
    evaluations = cfg.max_iters // cfg.eval_interval + 1
    validate = evaluations * cfg.eval_iters * run.eval_sources * micro_batch * T * flops_token / 3
    if run.name in rates.tokens_per_s:  # measured
        seconds = tokens / rates.tokens_per_s[run.name] + validate / rates.flops_per_s
    else:
        seconds = (tokens * flops_token + validate) / rates.flops_per_s
    return seconds / rates.gpus / 3600


def auto_eval_batch(gpu, model, args, task, prompt, itemsize):
    """evaluate.py --batch-size auto: the largest power of two of prompts, at most scoring.MAX_BATCH_ROWS
    rows (prompts x beams), whose weights, KV cache (prompt and new tokens of every row) and fp32 logits
    stay under memory.MARGIN of the card less its CUDA context."""
    c, beams = model.config, 1 if task.label_words else args.num_beams
    length = prompt + (0 if task.label_words else args.max_new_tokens or task.max_new_tokens)
    if not task.label_words:  # compiled decoding copies the prefilled cache into a static one of the block
        length += c.block_size
    per_row = c.n_layer * 2 * length * c.n_embd * itemsize + c.vocab_size * 4 * LOGIT_PASSES
    budget = MARGIN * (gpu.memory_gib - CUDA_CONTEXT_GIB) * 2 ** 30 - model.num_params() * (4 + itemsize)
    prompts = max(1, min(MAX_BATCH_ROWS, int(budget // per_row)) // beams)
    return 2 ** (prompts.bit_length() - 1)


def evaluation_hours(rates, gpu, model, args, owt_tokens=0):
    """One evaluate.py run (args: its parsed arguments) over every task, plus the web-text loss, its
    batches shared out over the processes. Compiled decoding (evaluate.py's default on CUDA) attends
    over the whole block every step (its static cache); every batch runs the task's full new-token cap,
    an upper bound that the pretrained model's zero- and few-shot outputs, which rarely stop early,
    come close to."""
    itemsize = torch.finfo(auto_dtype(gpu)).bits // 8
    forward_rate = rates.flops_per_s
    forward_flops = model.flops_per_token(model.config.block_size) / 3
    seconds = owt_tokens * forward_flops / forward_rate
    scored = tasks.TASKS if args.task == "all" else {args.task: tasks.TASKS[args.task]} if args.task in tasks.TASKS else {}
    for name, task in scored.items():
        n = min(EXAMPLES[name], args.limit or EXAMPLES[name])
        shots = 0 if args.protocol == "gpt2" else args.shots  # GPT-2's protocol is zero-shot
        prompt = PROMPT_TOKENS.get((name, shots))
        if prompt is None:
            raise UserError(f"no measured prompt length for {name} with shots={shots}: add it to PROMPT_TOKENS "
                            f"in bench/estimates.py (fewshot.build_prompts gives it)")
        batch = args.batch_size if args.batch_size != "auto" else auto_eval_batch(gpu, model, args, task, prompt, itemsize)
        batches = math.ceil(n / batch)
        seconds += batches * batch * prompt * forward_flops / forward_rate
        if task.label_words:  # label likelihoods: the prompt forward only
            seconds += batches * STEP_OVERHEAD_S
            continue
        steps = args.max_new_tokens or (GPT2_SUMMARY["max_new_tokens"] if args.protocol == "gpt2" else task.max_new_tokens)
        seconds += batches * steps * rates.decode_step_s(batch * args.num_beams, model.config.block_size)
    return seconds / rates.gpus / 3600


def estimate(gpu, preset=PRESET, rates=None):
    """Every figure of one card: its plan, micro-batches and hours per pipeline step (rates: measured
    ones, else card_rates over the preset's nproc GPUs)."""
    steps, pipe = preset_steps(preset)
    runs = training_steps(steps)
    dtype = auto_dtype(gpu)
    plan = cuda_plan(f"NVIDIA {gpu.label}", gpu.capability, gpu.memory_gib * 2 ** 30, dtype)
    model, _ = fake_model(runs[0].cfg.model_fields())  # finetuning keeps the pretrained architecture
    rates = rates or card_rates(gpu, model, pipe.nproc)
    row = {"card": gpu.label, "capability": f"sm{gpu.capability[0]}{gpu.capability[1]}", "memory_gib": gpu.memory_gib,
           "dtype": str(dtype).removeprefix("torch."), "flex_attention": plan.flex_attention, "plan": plan.line(),
           "mfu": MFU.get(gpu.label), "gpus": rates.gpus, "micro_batch": {}, "memory": {}, "hours": {}}
    for run in runs:
        row["micro_batch"][run.name], row["memory"][run.name] = micro_batch(gpu, model, run, dtype, rates.gpus)
        row["hours"][run.name] = training_hours(rates, model, run, max(1, row["micro_batch"][run.name]))
    owt_tokens = pipe.owt_max_tokens * pipe.owt_val_fraction
    for name, argv in steps.items():
        if name.startswith("evaluate"):
            args = evaluate.parse_args(argv)
            row["hours"][name] = evaluation_hours(rates, gpu, model, args, owt_tokens if args.owt_bin else 0)
    row["hours"]["total"] = sum(row["hours"].values())
    return row


def hours(h):
    return f"{h:.1f}" if h >= 1 else f"{h:.2f}"


def markdown(rows):
    runs = sum(k.startswith("evaluate") for k in rows[0]["hours"])
    lines = ["| card | dtype | packed finetuning | micro-batch: pretrain / finetune | pretrain h | finetune h "
             f"| evaluate h ({runs} runs) | total h |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h, mb = r["hours"], r["micro_batch"]
        evaluation = sum(v for k, v in h.items() if k.startswith("evaluate"))
        attention = "FlexAttention" if r["flex_attention"] else "dense mask"
        gpus = f"{r['gpus']} x " if r["gpus"] > 1 else ""
        lines.append(f"| {gpus}{r['card']} ({r['capability']}, {r['memory_gib']:.0f} GiB) | {r['dtype']} | {attention} "
                     f"| {mb['pretrain']} / {mb['finetune']} | {hours(h['pretrain'])} | {hours(h['finetune'])} "
                     f"| {hours(evaluation)} | {hours(h['total'])} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cards", default=",".join(README_CARDS), help="comma-separated labels of runtime.GPUS, or all")
    p.add_argument("--preset", default=PRESET, help="the pipeline preset (config/pipeline_<preset>.py)")
    p.add_argument("--json", action="store_true", help="print every figure as JSON instead of the table")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    known = {gpu.label: gpu for gpu in GPUS}
    labels = list(known) if args.cards == "all" else [c.strip() for c in args.cards.split(",")]
    unknown = [c for c in labels if c not in known]
    if unknown:
        raise UserError(f"unknown card {unknown[0]!r}; choose from {', '.join(known)} or all")
    rows = [estimate(known[label], args.preset) for label in labels]
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))
    return rows


if __name__ == "__main__":
    run_main(main)
