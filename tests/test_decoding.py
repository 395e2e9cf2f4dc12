"""Compiled decoding (generation.compile_decoding): after the prompt, every step is one compiled
call over a static cache, compiled once for a number of rows, and the tokens are the eager ones;
eager or compiled, a step waits on the host at most once. One small trained model is compiled
once for the module (a CPU compile takes 20-60 s), so every compiled call here has 16 rows."""
import collections
import contextlib
import copy
from unittest import mock

import pytest
import torch

from generation import batched_beam_search, compile_decoding

from test_beam_search import STOP, trained  # noqa: F401 (trained is a fixture)

ROWS = 16


@pytest.fixture(scope="module")
def models(trained):  # noqa: F811
    """(eager model, the same weights with compiled decoding, 16 prompts), compiled already."""
    model, prompts = trained
    prompts = prompts + [p[:len(p) // 2 + 1] for p in prompts]
    fast = compile_decoding(copy.deepcopy(model))
    fast.generate(prompts, 2, stop_tokens=())
    return model, fast, prompts


def test_compiled_greedy_decoding_gives_the_eager_tokens(models):
    model, fast, prompts = models
    eager = model.generate(prompts, 30, stop_tokens=(STOP,))
    assert fast.generate(prompts, 30, stop_tokens=(STOP,)) == eager
    assert len({len(tokens) for tokens in eager}) > 2  # rows stop at different steps


# (num_beams, no_repeat_ngram_size, length_penalty, max_new_tokens), num_beams dividing 16 rows;
# a length penalty above 1 lets a longer hypothesis beat the finished ones after a search is over,
# so a finished prompt whose rows run on must be ignored
SETTINGS = [(4, 0, 1.0, 30), (4, 0, 2.0, 30), (4, 3, 1.0, 7), (2, 2, 3.0, 30), (2, 0, 0.0, 30), (2, 0, 1.5, 5)]


@pytest.mark.parametrize("num_beams,ngram,penalty,max_new", SETTINGS)
def test_compiled_beam_search_gives_the_eager_hypotheses(models, num_beams, ngram, penalty, max_new):
    model, fast, prompts = models
    batch = prompts[:ROWS // num_beams]
    eager = batched_beam_search(model, batch, num_beams, max_new, penalty, ngram, (STOP,))
    assert batched_beam_search(fast, batch, num_beams, max_new, penalty, ngram, (STOP,)) == eager


def test_compiled_decoding_compiles_once_for_a_number_of_rows(models):
    """New prompt lengths, searches that end at different steps (compiled beam search keeps their
    rows), another number of beams: the step compiled by the fixture serves them all."""
    model, fast, prompts = models
    with torch._dynamo.config.patch(error_on_recompile=True):
        fast.generate(prompts[::-1], 12, stop_tokens=(STOP,))
        fast.generate([p[-2:] for p in prompts], 12, stop_tokens=(STOP,))
        found = batched_beam_search(fast, prompts[:4], 4, 30, stop_tokens=(STOP,))
        batched_beam_search(fast, prompts[4:12], 2, 30, no_repeat_ngram_size=2, stop_tokens=(STOP,))
    assert len({len(tokens) for tokens in found}) > 1  # the searches did end at different steps


# what makes the host wait for the device (on a GPU), as Python code can call it
SYNCING = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "cpu", "numpy")


@contextlib.contextmanager
def counted_syncs():
    counts = collections.Counter()

    def counting(name, original):
        def method(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return method

    with mock.patch.multiple(torch.Tensor, **{n: counting(n, getattr(torch.Tensor, n)) for n in SYNCING}):
        yield counts


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_a_decoding_step_syncs_with_the_host_at_most_once(models, compiled, search):
    """Twice the steps cost at most one sync more a step (the setup's syncs cancel out). The GPU
    version, tests/test_cuda.py, also sees syncs inside torch (e.g. a boolean mask index)."""
    model, fast, prompts = models
    model = fast if compiled else model
    if search == "greedy":
        def decode(steps):  # no stop token: every run takes all its steps
            return model.generate(prompts, steps, stop_tokens=())
    else:
        def decode(steps):
            return batched_beam_search(model, prompts[:4], 4, steps, no_repeat_ngram_size=2, stop_tokens=())
    syncs = {}
    for steps in (8, 16):
        with counted_syncs() as counts:
            decode(steps)
        syncs[steps] = sum(counts.values())
    assert 0 < syncs[16] - syncs[8] <= 8
