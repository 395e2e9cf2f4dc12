"""Fitting a batch to memory: the search that training and evaluation share (memory.py)."""
import pytest
import torch

import memory

CPU = torch.device("cpu")


def limited_to(limit, tried):
    def attempt(size):
        tried.append(size)
        if size > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size} GiB")
    return attempt


@pytest.mark.parametrize("limit", [0, 1, 5, 12, 60, 1000])
def test_the_largest_size_that_does_not_run_out_of_memory_is_found_by_bisection(limit):
    sizes = [1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60]  # the divisors of 60 sequences per process
    tried = []
    best, tries = memory.largest_that_fits(sizes, limited_to(limit, tried), CPU)
    fitting = [s for s in sizes if s <= limit]
    assert best == (max(fitting) if fitting else None)
    assert len(tried) <= 4  # log2 of 12 candidates, not all of them
    assert [(s, ok) for s, _, ok in tries] == [(s, s <= limit) for s in tried]


def test_an_error_that_is_not_about_memory_is_not_taken_for_too_large():
    def broken(size):
        raise RuntimeError("expected scalar type Float but found Half")
    with pytest.raises(RuntimeError, match="scalar type"):
        memory.largest_that_fits([1, 2, 4], broken, CPU)


def test_out_of_memory_errors_of_cuda_and_mps_are_recognised():
    assert memory.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert memory.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"))
    assert not memory.is_out_of_memory(RuntimeError("shape mismatch"))


def test_a_size_that_fits_but_peaks_above_the_margin_does_not_count(monkeypatch):
    """On a GPU a try must also stay below MARGIN of the memory left for us (others' use subtracted)."""
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (14 * gib, 16 * gib))  # 2 GiB held by others
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    used = {}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: used["bytes"])
    assert memory.budget(torch.device("cuda:0")) == int(0.9 * 14 * gib)

    def attempt(size):  # 1 GiB of weights and optimizer state, 1 GiB per sequence
        used["bytes"] = (1 + size) * gib
    best, _ = memory.largest_that_fits(range(1, 33), attempt, torch.device("cuda:0"))
    assert best == 11  # 12 GiB <= 12.6 GiB; 13 GiB is above
    assert memory.budget(CPU) is None and memory.peak(CPU) is None
