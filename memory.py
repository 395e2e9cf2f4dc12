"""Device memory: how much a run may use, what it used at its peak, and the largest batch that fits.

Training (trainer.py) fits its micro-batch and evaluation (scoring.py) its decoding batch with
largest_that_fits(): each tries sizes for real and keeps the largest that neither runs out of
memory nor peaks above MARGIN of what the card has free for us. Only CUDA reports its memory; on
the CPU and MPS a size fits unless an allocation fails.
"""
import gc
import sys

import torch

# a tried size must peak below this share of the memory available to us: a packed batch with more
# target tokens, the compiled graph and allocator fragmentation all add to what one try measures
MARGIN = 0.9


def is_out_of_memory(error):
    """CUDA's OutOfMemoryError, or the RuntimeError MPS raises for the same thing."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def budget(device, margin=MARGIN):
    """Bytes a try may peak at: margin of the card's memory less what other processes and the CUDA
    context hold (None where the device reports no memory: the CPU, MPS)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)
    return int(margin * (total - others))


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    """Peak bytes allocated since reset_peak() (None where the device does not report it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def peak_mib(device):
    """Peak memory so far, for the log: allocated on CUDA, else the process's peak resident set (None
    where the platform does not say)."""
    if device.type == "cuda":
        return peak(device) / 2 ** 20
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def release(device):
    """Return what failed or finished tries cached to the device, so the next try starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def largest_that_fits(sizes, attempt, device, margin=MARGIN, agree=None):
    """The largest of `sizes` for which attempt(size) neither runs out of memory nor peaks above the
    budget, by bisection (memory grows with the size), and the tries as [(size, peak bytes or None,
    fitted)]. None if even the smallest does not fit. attempt(size) does the real work at that size;
    what it returns is ignored. agree(fitted) -> fitted makes several processes take the same path
    (e.g. an all-reduce MIN: a size fits only if it fits everywhere)."""
    sizes, tries = sorted(set(sizes)), []
    limit = budget(device, margin)

    def fits(size):
        reset_peak(device)
        try:
            attempt(size)
            used = peak(device)
            ok = limit is None or used is None or used <= limit
        except Exception as e:  # only memory errors mean "too large"; anything else is a real bug
            if not is_out_of_memory(e):
                raise
            used, ok = None, False
        release(device)
        if agree is not None:
            ok = agree(ok)
        tries.append((size, used, ok))
        return ok

    best, low, high = None, 0, len(sizes) - 1
    while low <= high:
        middle = (low + high) // 2
        if fits(sizes[middle]):
            best, low = sizes[middle], middle + 1
        else:
            high = middle - 1
    return best, tries
