"""Batched beam search: many prompts in one batch give, prompt by prompt, exactly what the
per-prompt reference search gives, on a trained model whose beams really diverge."""
import numpy as np
import pytest
import torch

from generation import batched_beam_search, beam_search
from model import GPT, GPTConfig, KVCache

STOP, SEP, VOCAB = 0, 21, 32


def documents(rng, n_docs):
    """'pattern i SEP pattern i+1 STOP' with patterns of unequal frequency and 5% noise: the model
    must remember the first half (so the cache matters), and beams branch at every pattern start."""
    patterns = [rng.integers(1, 21, size=n) for n in rng.integers(4, 9, size=6)]
    weights = np.array([8, 4, 3, 2, 1, 1]) / 19
    docs = []
    for i in rng.choice(len(patterns), size=n_docs, p=weights):
        doc = np.concatenate([patterns[i], [SEP], patterns[(i + 1) % len(patterns)], [STOP]])
        noise = rng.random(len(doc)) < 0.05
        doc[noise] = rng.integers(1, 21, size=noise.sum())
        docs.append(doc)
    return torch.tensor(np.concatenate(docs), dtype=torch.long)


@pytest.fixture(scope="module")
def trained():
    """A tiny GPT trained for 300 steps (seconds), and prompts of different lengths from its data."""
    rng = np.random.default_rng(0)
    data = documents(rng, 800)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        starts = torch.randint(0, len(data) - 49, (16,)).tolist()
        x = torch.stack([data[s:s + 48] for s in starts])
        y = torch.stack([data[s + 1:s + 49] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    starts = rng.integers(0, len(data) - 30, size=8)
    prompts = [data[s:s + n].tolist() for s, n in zip(starts, [3, 17, 6, 1, 11, 24, 8, 14])]
    return model.eval(), [p[:-1] if p[-1] == STOP and len(p) > 1 else p for p in prompts]


# (num_beams, no_repeat_ngram_size, length_penalty, max_new_tokens): short limits make
# hypotheses end at the last step, length penalty 0 favours early stops
SETTINGS = [(4, 0, 1.0, 30), (4, 2, 2.0, 30), (3, 3, 0.5, 30), (4, 0, 0.0, 30), (4, 3, 1.0, 7), (2, 0, 1.5, 5)]


@pytest.mark.parametrize("num_beams,ngram,penalty,max_new", SETTINGS)
def test_batched_beam_search_equals_the_per_prompt_search(trained, num_beams, ngram, penalty, max_new):
    model, prompts = trained
    expected = [beam_search(model, p, num_beams, max_new, penalty, ngram, (STOP,)) for p in prompts]
    assert batched_beam_search(model, prompts, num_beams, max_new, penalty, ngram, (STOP,)) == expected
    # the same prompts in another order and batch size: each result follows its prompt
    order = [5, 0, 3]
    got = batched_beam_search(model, [prompts[i] for i in order], num_beams, max_new, penalty, ngram, (STOP,))
    assert got == [expected[i] for i in order]


def test_the_trained_model_makes_beams_matter(trained):
    """Guards the test above: with beams that never reorder, a wrong cache row would go unseen."""
    model, prompts = trained
    greedy = [beam_search(model, p, 1, 30, stop_tokens=(STOP,)) for p in prompts]
    beams = batched_beam_search(model, prompts, 4, 30, 2.0, 2, (STOP,))
    assert sum(b != g for b, g in zip(beams, greedy)) >= 2
    assert len({len(b) for b in beams}) >= 3 and any(0 < len(g) < 30 for g in greedy)


def test_cache_reorder_copies_the_filled_prefix_only():
    config = GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=8)
    cache = KVCache(config, 3, 10, "cpu")
    cache.k.normal_()
    cache.length = 4
    before = cache.k.clone()
    cache.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.k[:, :, :, :4], before[:, [2, 2, 0], :, :4])
    assert torch.equal(cache.k[:, :, :, 4:], before[:, :, :, 4:])  # the unused tail is not touched
    moved = cache.k.clone()
    cache.reorder(torch.tensor([2, 1, 0]), start=3)  # positions before 3: a prompt the rows share
    assert torch.equal(cache.k[:, :, :, :3], moved[:, :, :, :3])
    assert torch.equal(cache.k[:, :, :, 3:4], moved[:, [2, 1, 0], :, 3:4])
    cache.reorder(torch.tensor([2, 1, 0]), start=3)
    cache.reorder(torch.tensor([2, 2, 2, 0, 0]))  # more rows: new tensors, same max_len
    assert cache.k.shape[1] == 5 and cache.k.shape[3] == 10
    assert torch.equal(cache.k[:, :, :, :4], before[:, [0, 0, 0, 2, 2], :, :4])


def test_batched_beam_search_rejects_bad_arguments(trained):
    model, prompts = trained
    with pytest.raises(ValueError, match="num_beams"):
        batched_beam_search(model, prompts, 0, 5)
    with pytest.raises(ValueError, match="block_size"):
        batched_beam_search(model, prompts, 2, 60)
    assert batched_beam_search(model, prompts, 2, 0) == [[] for _ in prompts]
