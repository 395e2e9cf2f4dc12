"""Where the model runs: device, autocast dtype, CPU threads and (under torchrun) the process group.

Training, evaluation, sampling and the benches all start here, so a device bug is fixed once.
"""
import contextlib
import dataclasses
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

from common import UserError

# dense bf16 peak FLOP/s per GPU, for MFU
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                  "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dtype: torch.dtype = torch.float32

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


def pick_dtype(name, device):
    """auto: bf16 on GPUs that have it, fp16 (with a GradScaler) on older ones, fp32 on CPU and MPS."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # emulated bf16 is slow (V100, T4)
        return torch.bfloat16 if native_bf16 else torch.float16
    if name not in DTYPES:
        raise UserError(f"dtype={name!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[name]


def setup_runtime(device="auto", dtype="auto", num_threads=0, backend="auto"):
    """The Runtime of this process; joins the process group when started by torchrun."""
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
    return Runtime(device, rank, world_size, local_rank, pick_dtype(dtype, device))


def compile_blocker(device):
    """Why torch.compile cannot run here (None if it can). The CPU preset compiles by default, so a
    laptop without a C++ compiler (or without Python headers, or a Mac's clang without OpenMP), or a
    Mac on MPS (inductor's MPS backend is a prototype), must train eager with a line that says so,
    not die on the first step. A tiny function compiled on the device is the probe."""
    if device.type == "mps":
        return "inductor's MPS backend is a prototype"
    if device.type == "cpu":
        default = {"darwin": "clang++", "win32": "cl"}.get(sys.platform, "g++")  # inductor's own defaults
        cxx = os.environ.get("CXX", default)
        if not shutil.which(cxx):
            return f"inductor needs a C++ compiler on the CPU and {cxx!r} is not on PATH (install one or set CXX)"
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=device))
    except Exception as e:  # any failure here means the model would fail too
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"torch.compile failed on a probe ({type(e).__name__}: {first})"
    return None


def maybe_compile(model, wanted, rt):
    """torch.compile(model) if asked for and possible here; otherwise the model, with one line on why."""
    if not wanted:
        return model
    blocker = compile_blocker(rt.device)
    if blocker:
        if rt.master:
            print(f"compile=true: running eager, {blocker} (--compile=false silences this)", flush=True)
        return model
    return torch.compile(model)


def peak_flops(device, configured=0.0):
    """FLOP/s that MFU divides by: configured, else the GPU's datasheet bf16 peak, else on CPU a
    measured fp32 matmul rate (the best this CPU does in practice)."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 0.0)
    if device.type == "cpu":
        a = torch.ones(1024, 1024)  # not randn: must not move the RNG a resumed run restored
        a @ a
        t0, n = time.perf_counter(), 10
        for _ in range(n):
            a @ a
        return 2 * 1024 ** 3 * n / (time.perf_counter() - t0)
    return 0.0
