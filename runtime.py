"""Where the model runs: device, autocast dtype, CPU threads and (under torchrun) the process group.

Training, evaluation, sampling and the benches all start here, so a device bug is fixed once.
"""
import contextlib
import dataclasses
import functools
import importlib.util
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

from common import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class GPU:
    """A card as the datasheets describe it: MFU divides by its peak, bench/estimates.py builds its
    per-card table from the rest."""
    label: str  # how the README names it
    match: str  # a substring of torch.cuda.get_device_name() (the first matching entry wins)
    capability: tuple  # CUDA compute capability
    memory_gib: float  # total memory as CUDA reports it (the GiB of an out-of-memory message)
    peak_flops: float  # dense tensor-core FLOP/s, fp32 accumulate, in the dtype dtype=auto picks:
    #                    bf16 from sm80, fp16 before (no sparsity: datasheets quote 2x with it)
    bandwidth: float  # memory bytes/s


# Sources: NVIDIA's datasheets (H200, H100 SXM5 and PCIe, A100, L40S, L4, T4, V100 SXM2), the Ada
# (RTX 4090) and Ampere GA102 (RTX 3090) whitepapers' "FP16 Tensor with FP32 accumulate" rows. The
# A10G has no published tensor figure: it is AWS's GA102 (80 SMs, 1.71 GHz boost, 600 GB/s); 70 TF
# assumes GeForce-rate tensor math (512 FMA-flops per SM per clock with fp32 accumulate, as the RTX
# 3090's 71 TF), which matches Baseten's A10-vs-A10G comparison ("the A10 prioritizes tensor
# compute"; the A10, 72 SMs at full rate, is 125 TF). A first run's MFU on an A10G settles it.
# Memory: T4 14.75, A10G 22.19, V100-16GB 15.78, A100-40GB 39.39, A100/H100-80GB 79.15 GiB are
# what PyTorch's out-of-memory messages report as total capacity; the others approximate it from
# nvidia-smi's total (which is ~0.4 GiB more).
GPUS = (
    GPU("H200", "H200", (9, 0), 139.7, 989e12, 4.8e12),
    GPU("H100 PCIe", "H100 PCIe", (9, 0), 79.15, 756e12, 2.0e12),
    GPU("H100", "H100", (9, 0), 79.15, 989e12, 3.35e12),  # SXM5
    GPU("A100 80GB", "A100", (8, 0), 79.15, 312e12, 2.039e12),  # SXM4 (PCIe: 1.935 TB/s)
    GPU("A100 40GB", "A100", (8, 0), 39.39, 312e12, 1.555e12),
    GPU("L40S", "L40S", (8, 9), 44.4, 362e12, 0.864e12),  # L40S and L40 before "L4", which they contain
    GPU("L40", "L40", (8, 9), 44.4, 181e12, 0.864e12),
    GPU("L4", "L4", (8, 9), 22.0, 121e12, 0.3e12),
    GPU("A10G", "A10G", (8, 6), 22.19, 70e12, 0.6e12),
    GPU("RTX 4090", "RTX 4090", (8, 9), 23.6, 165e12, 1.008e12),
    GPU("RTX 3090", "RTX 3090", (8, 6), 23.6, 71e12, 0.936e12),
    GPU("V100 32GB", "V100", (7, 0), 31.75, 125e12, 0.9e12),  # SXM2 (PCIe: 112 TF)
    GPU("V100 16GB", "V100", (7, 0), 15.78, 125e12, 0.9e12),
    GPU("T4", "T4", (7, 5), 14.75, 65e12, 0.32e12),
)


def known_gpu(name):
    """The GPUS entry of a card, by the name CUDA gives it (None for a card not in the catalogue)."""
    return next((gpu for gpu in GPUS if gpu.match in name), None)


@dataclasses.dataclass
class DevicePlan:
    """How this process uses its device, decided once at startup from what the device is (on CUDA,
    its compute capability) by the rules of cuda_plan(). A path a rule allows is confirmed by a probe
    where it is first used (maybe_compile, choose_attention), which can only turn it off."""
    device: str  # "NVIDIA A10G (sm86, 22.2 GiB)", "cpu", "mps"
    dtype: torch.dtype  # autocast dtype (float32: none)
    capability: tuple = None  # CUDA compute capability
    compile_blocker: str = None  # why torch.compile cannot run here (None: it can)
    flex_blocker: str = None  # why packed finetuning takes the dense document mask, not FlexAttention
    fused_adamw: bool = False
    sdpa: tuple = ()  # SDPA backends that can run causal training attention here, in PyTorch's order
    dtype_warning: str = None

    @property
    def compile(self):
        return self.compile_blocker is None

    @property
    def flex_attention(self):
        return self.flex_blocker is None

    def line(self):
        """One line saying what this run will use."""
        dtype = str(self.dtype).removeprefix("torch.")
        if self.dtype == torch.float16:
            dtype += " with loss scaling"
        elif self.dtype_warning:
            dtype += " (emulated)"
        elif self.dtype == torch.float32 and self.capability and native_bf16(self.capability):
            dtype += " (TF32 matmuls)"
        parts = [dtype,
                 "FlexAttention for packed finetuning" if self.flex_attention
                 else f"dense document mask for packed finetuning ({self.flex_blocker})",
                 "torch.compile" if self.compile else f"eager ({self.compile_blocker})",
                 "fused AdamW" if self.fused_adamw else "AdamW"]
        if self.sdpa:
            parts.append("SDPA " + "/".join(self.sdpa))
        return f"{self.device}: " + ", ".join(parts)


@dataclasses.dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dtype: torch.dtype = torch.float32
    plan: DevicePlan = None  # what this device runs (plan_device's, unless given)

    def __post_init__(self):
        if self.plan is None:
            self.plan = plan_device(self.device, self.dtype)

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def pick_device(name, local_rank=0):
    """auto | cpu | cuda | cuda:N | mps -> an indexed torch.device (CUDA calls reject a bare "cuda")."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device=cuda but CUDA is not available; use --device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps but MPS is not available; use --device=cpu")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r}; choose auto, cpu, cuda, cuda:N or mps") from None


def synchronize(device):
    """Wait for the device's queued work (a no-op off CUDA): for timings, and nowhere else."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_bf16(capability):
    """bf16 tensor cores arrived with Ampere (sm80). Before it bf16 is emulated, several times slower
    than fp16, and Triton cannot compile it (ptxas: "Feature '.bf16' requires .target sm_80 or
    higher": karpathy/nanoGPT#525, pytorch/pytorch#118449)."""
    return tuple(capability) >= (8, 0)


def pick_dtype(name, device):
    """auto: bf16 on GPUs that have it (sm80+), fp16 (with a GradScaler) on older ones (V100, T4),
    fp32 on CPU and MPS."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if native_bf16(torch.cuda.get_device_capability(device)) else torch.float16
    if name not in DTYPES:
        raise UserError(f"dtype={name!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[name]


def sdpa_backends(capability, dtype, cudnn_version=0):
    """The backends F.scaled_dot_product_attention can pick for causal training attention (no mask)
    on this card in this dtype, in the order it tries them. From PyTorch's dispatch rules
    (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp): cuDNN goes first only on sm90/sm100
    with cuDNN 9.9+ (check_prefer_cudnn_attention); FlashAttention-2 needs sm80-sm121 and fp16/bf16;
    the memory-efficient kernel runs from sm50, in bf16 only from sm80; math always runs. A dense
    mask (finetuning without FlexAttention) rules out flash: the memory-efficient kernel takes it."""
    half, ampere = dtype in (torch.float16, torch.bfloat16), native_bf16(capability)
    backends = []
    if half and ampere and capability[0] in (9, 10) and capability[1] == 0 and cudnn_version >= 90900:
        backends.append("cuDNN")
    if half and ampere:
        backends.append("flash")
    if tuple(capability) >= (5, 0) and (dtype != torch.bfloat16 or ampere):
        backends.append("mem-efficient")
    return tuple(backends + ["math"])


def triton_blocker(capability, dtype, triton=True):
    """Why Triton (torch.compile's CUDA backend, and FlexAttention's kernel) cannot run here, or None."""
    if not triton:
        return "Triton is not installed (pip install triton)"
    if tuple(capability) < (7, 0):  # inductor refuses older cards itself ("too old to be supported")
        return f"Triton needs sm70+, this card is sm{capability[0]}{capability[1]}"
    if dtype == torch.bfloat16 and not native_bf16(capability):
        return "Triton cannot compile bfloat16 before sm80"
    return None


def has_triton():
    return importlib.util.find_spec("triton") is not None


def cuda_plan(name, capability, memory_bytes, dtype, triton=True, cudnn_version=0):
    """The rules for a CUDA card, from what it is (no probe: tests run them for every capability)."""
    capability = tuple(capability)
    plan = DevicePlan(f"{name} (sm{capability[0]}{capability[1]}, {memory_bytes / 2 ** 30:.1f} GiB)", dtype,
                      capability, fused_adamw=True, sdpa=sdpa_backends(capability, dtype, cudnn_version))
    plan.compile_blocker = triton_blocker(capability, dtype, triton)
    # FlexAttention compiles its own Triton kernel, which PyTorch tunes and tests on sm80+ (A100, A10G,
    # H100). Before Ampere it is untested and fails where shared memory is short: 64 KiB per block on
    # Turing (pytorch/pytorch#164813, a 2080 Ti); sm86/89's 99 KiB already fail at head sizes over 128
    # (#133254, #180278). The dense mask gives the same result (tests/test_model.py), so older cards
    # take it; on newer ones choose_attention() confirms with a probe at the model's head size.
    plan.flex_blocker = plan.compile_blocker if native_bf16(capability) else "FlexAttention needs sm80+"
    if dtype == torch.bfloat16 and not native_bf16(capability):
        plan.dtype_warning = (f"dtype=bfloat16 on {name} (sm{capability[0]}{capability[1]}) is emulated: no bf16 "
                              f"tensor cores before sm80, so matmuls are slow, SDPA falls back to math and "
                              f"torch.compile to eager; dtype=auto picks float16 with loss scaling")
    return plan


def plan_device(device, dtype):
    """The DevicePlan of a device: on CUDA the card's rules (cuda_plan), elsewhere what the CPU or MPS
    allow. Cheap: the probes run where a path is first used."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return cuda_plan(props.name, (props.major, props.minor), props.total_memory, dtype, has_triton(),
                         torch.backends.cudnn.version() or 0)
    flex = "FlexAttention has no backward on the CPU" if device.type == "cpu" else "FlexAttention needs CUDA"
    return DevicePlan(device.type, dtype, compile_blocker=compile_rule(device), flex_blocker=flex)


def setup_runtime(device="auto", dtype="auto", num_threads=0, backend="auto"):
    """The Runtime of this process; joins the process group when started by torchrun. Prints its
    DevicePlan's line (and a warning for bfloat16 where it is emulated)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if num_threads:
        torch.set_num_threads(num_threads)
    elif device.type == "cpu" and world_size > 1:  # share the cores: oversubscribed OpenMP threads crawl
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if world_size > 1 and not dist.is_initialized():
        backend = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend)
    rt = Runtime(device, rank, world_size, local_rank, pick_dtype(dtype, device))
    if rt.master:
        print(rt.plan.line(), flush=True)
        if rt.plan.dtype_warning:
            print(f"warning: {rt.plan.dtype_warning}", flush=True)
    return rt


def compile_rule(device):
    """Why torch.compile cannot run on a CPU or MPS device (None if the rules allow it). The CPU preset
    compiles by default, so a laptop without a C++ compiler, or a Mac on MPS (inductor's MPS backend
    is a prototype), must train eager with a line that says so, not die on the first step."""
    if device.type == "mps":
        return "inductor's MPS backend is a prototype"
    if device.type == "cpu":
        default = {"darwin": "clang++", "win32": "cl"}.get(sys.platform, "g++")  # inductor's own defaults
        cxx = os.environ.get("CXX", default)
        if not shutil.which(cxx):
            return f"inductor needs a C++ compiler on the CPU and {cxx!r} is not on PATH (install one or set CXX)"
    return None


def compile_blocker(device, dtype=torch.float32):
    """Why torch.compile cannot run here (None if it can): the device's rules, then a tiny function
    compiled on the device as a probe (a compiler that is there but cannot build: no Python headers,
    a Mac's clang without OpenMP, a broken Triton)."""
    blocker = plan_device(device, dtype).compile_blocker
    if blocker:
        return blocker
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=device))
    except Exception as e:  # any failure here means the model would fail too
        return f"torch.compile failed on a probe ({first_line(e)})"
    return None


def first_line(error):
    return f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0][:160]


def maybe_compile(model, wanted, rt):
    """torch.compile(model) if asked for and possible here; otherwise the model, with one line on why."""
    if not wanted:
        return model
    blocker = compile_blocker(rt.device, rt.dtype)
    if blocker:
        rt.plan.compile_blocker = blocker
        if rt.master:
            print(f"compile=true: running eager, {blocker} (--compile=false silences this)", flush=True)
        return model
    return torch.compile(model)


@functools.cache
def flex_attention_failure(device, dtype, head_dim):
    """Why FlexAttention's compiled kernel cannot train here (None if it can): forward and backward
    through a causal block mask, at the model's head size and dtype, on one 256-token head. Its own
    function, so that its shapes do not make dynamo recompile the model's FlexAttention as dynamic."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def probe(q, k, v, mask):
        return flex_attention(q, k, v, block_mask=mask)
    try:
        q, k, v = (torch.randn(1, 1, 256, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        mask = create_block_mask(lambda b, h, q, k: k <= q, 1, None, 256, 256, device=device)
        torch.compile(probe)(q, k, v, mask).sum().backward()
    except Exception as e:  # shared memory too small, no valid Triton config, ...: the model would fail too
        return f"FlexAttention failed a probe ({first_line(e)})"
    return None


def choose_attention(model, rt):
    """Set the model's path for packed documents (GPT.use_flex_attention) from the plan: FlexAttention
    where the rules allow it and a probe at the model's head size passes, else the dense document
    mask, with one line on why. Returns whether FlexAttention is used."""
    if rt.plan.flex_attention:
        failure = flex_attention_failure(rt.device, rt.dtype, model.config.n_embd // model.config.n_head)
        if failure:
            rt.plan.flex_blocker = failure
            if rt.master:
                print(f"packed finetuning: the dense document mask, {failure}", flush=True)
    model.use_flex_attention = rt.plan.flex_attention
    return rt.plan.flex_attention


def peak_flops(device, configured=0.0, threads=0):
    """FLOP/s that MFU divides by: configured, else the GPU's datasheet peak (GPUS), else on CPU the
    best measured fp32 matmul rate at the run's thread count (cpu_peak_flops)."""
    if configured:
        return configured
    if device.type == "cuda":
        known = known_gpu(torch.cuda.get_device_name(device))
        return known.peak_flops if known else 0.0
    if device.type == "cpu":
        return cpu_peak_flops(threads)
    return 0.0


def cpu_peak_flops(threads=0, repeats=5):
    """The best of `repeats` timed fp32 matmul rates at `threads` threads (0: as many as now), the
    best this CPU does in practice: a CPU's rate depends on its thread count, and the fastest timing
    is the one least slowed by other work on the machine (one timing beside another job once put a
    run's MFU at 149%)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return max(matmul_rate() for _ in range(repeats))
    finally:
        torch.set_num_threads(previous)


def matmul_rate(size=1024, n=4):
    """FLOP/s of n products of two size x size fp32 matrices, after one untimed."""
    a = torch.ones(size, size)  # not randn: must not move the RNG a resumed run restored
    a @ a
    t0 = time.perf_counter()
    for _ in range(n):
        a @ a
    return 2 * size ** 3 * n / (time.perf_counter() - t0)
