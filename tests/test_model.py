"""The model: causal, trainable, and its cached batched generation matches the plain one."""

import pytest
import torch

import tasks
from common import get_tokenizer
from data import loss_positions
from generation import label_logprobs
from model import GPT, GPTConfig

VARIANTS = {
    "gpt2": {},
    "modern": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False, bias=False),
    "relu2": dict(mlp="relu2"),
    "v2": dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, bias=False, logit_softcap=15.0),
}


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32, **kw)).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_future_token_leaves_past_logits_unchanged(variant):
    model = tiny(**VARIANTS[variant])
    x = torch.randint(0, 512, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 512
    logits_x, _ = model(x, all_logits=True)
    logits_y, _ = model(y, all_logits=True)
    assert torch.allclose(logits_x[:, :9], logits_y[:, :9], atol=1e-6)
    assert not torch.allclose(logits_x[:, 9], logits_y[:, 9])


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_with_cache_equals_without(variant):
    model = tiny(**VARIANTS[variant])
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    cached = model.generate(prompts, 24, stop_tokens=())
    assert cached == model.generate(prompts, 24, stop_tokens=(), use_cache=False)
    assert all(len(c) == 24 for c in cached)


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_of_different_lengths_equals_each_prompt_alone(variant):
    model = tiny(**VARIANTS[variant])
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    alone = [model.generate([p], 16, stop_tokens=())[0] for p in prompts]
    assert model.generate(prompts, 16, stop_tokens=()) == alone


@pytest.mark.parametrize("flex", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_documents_each_see_only_themselves_from_position_0(variant, flex):
    # flex=True: FlexAttention's block mask, as on a GPU (on the CPU it runs forward only, unfused)
    model = tiny(**VARIANTS[variant])
    model.use_flex_attention = flex
    docs = [torch.randint(0, 512, (n,)) for n in (5, 9, 2)]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed, _ = model(torch.cat(docs)[None], positions=positions, all_logits=True)
        alone = torch.cat([model(d[None], all_logits=True)[0] for d in docs], 1)
    assert torch.allclose(packed, alone, atol=1e-5)


def test_generation_stops_at_stop_token_and_drops_it():
    model = tiny()
    free = model.generate([[1, 2, 3]], 10, stop_tokens=())[0]
    stop = free[4]
    out = model.generate([[1, 2, 3]], 10, stop_tokens=(stop,))[0]
    assert out == free[:free.index(stop)]


def test_sampling_respects_top_k_and_seed():
    model = tiny()
    g = torch.Generator().manual_seed(1)
    a = model.generate([[1, 2, 3]], 8, temperature=1.0, top_k=1, generator=g, stop_tokens=())
    assert a == model.generate([[1, 2, 3]], 8, stop_tokens=())  # top-1 sampling is greedy
    s1 = model.generate([[1, 2]], 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    s2 = model.generate([[1, 2]], 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert s1 == s2


def test_generation_never_returns_padding_vocab_ids():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=1, n_embd=16)).eval()
    with torch.no_grad():
        model.lm_head.weight[50257:] += 5.0  # make the padding ids the most likely
    out = model.generate([[1, 2]], 5, stop_tokens=())[0]
    assert max(out) < 50257


def test_prompt_plus_new_tokens_beyond_block_size_is_an_error():
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny().generate([[1] * 60], 10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_model_overfits_one_batch(variant):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=64, **VARIANTS[variant]))
    x = torch.randint(0, 128, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_loss_rows_weigh_only_the_positions_they_name():
    model = tiny()
    x = torch.randint(0, 512, (2, 10))
    y = torch.randint(0, 512, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 6:] = True
    rows, weights = loss_positions(mask.numpy(), bucket=16)  # padded: 8 real rows, 8 of weight 0
    assert len(rows) == 16 and float(weights.sum()) == pytest.approx(1.0)
    logits_out, masked = model(x, targets=y, loss_rows=rows, loss_weights=weights)
    assert logits_out is None  # training never hands back the B x T x V logits
    logits, _ = model(x, all_logits=True)
    expected = torch.nn.functional.cross_entropy(logits[:, 6:].reshape(-1, 512), y[:, 6:].reshape(-1))
    assert torch.allclose(masked, expected, atol=1e-5)


def test_parameter_count_and_flops():
    model = GPT(GPTConfig())  # GPT-2 small
    assert abs(model.num_params() - 124.0e6) < 0.5e6  # 124M with the padded vocab, tied, without wpe
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 12 * 768 * 1024


def test_bad_architecture_choice_is_a_clear_error():
    with pytest.raises(ValueError, match="norm='batchnorm'; choose one of"):
        GPTConfig(norm="batchnorm")


def test_label_logprobs_under_bf16_autocast_match_float32(shared_data, monkeypatch):
    """The output layer runs in float32 at inference (GPT.output_logits), so bf16 autocast leaves only
    the body's rounding. Logits up to ~13 (the head scaled as a trained model's): the label
    log-probabilities of 32 SST-2 prompts agree with float32 within 0.005 nats (measured 0.0014),
    where the bf16 head was off by 0.03."""
    enc, task = get_tokenizer(), tasks.get_task("sst2")
    rows = task.load_rows("validation", str(shared_data), limit=32)
    prompts = [task.prompt(r, enc, 128).ids for r in rows]
    labels = [enc.encode_ordinary(w) for w in task.label_words]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(10)  # logits of a trained model's size, not ~0 as at initialization
        assert 8 < model(torch.tensor([prompts[0]]))[0].abs().max() < 20
    exact = label_logprobs(model, prompts, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.tensor([prompts[0]]))[0].dtype == torch.float32
        fast = label_logprobs(model, prompts, labels)
        monkeypatch.setattr(GPT, "output_logits", lambda self, x: self.lm_head(x))  # the head as it was: bf16
        before = label_logprobs(model, prompts, labels)
    assert (fast - exact).abs().max() < 0.005
    assert (before - exact).abs().max() > 4 * (fast - exact).abs().max()
