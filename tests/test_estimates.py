"""bench/estimates.py: the README's per-card table of the gpu pipeline preset (estimates, not measurements):
its command runs, its memory measurement counts what autograd really saves, and its figures are
consistent with each other (more memory never fits less, faster cards take fewer hours)."""
import dataclasses
import runpy

import pytest
import torch

import runtime
from model import GPT, GPTConfig

from conftest import ROOT

estimates = runpy.run_path(str(ROOT / "bench" / "estimates.py"))
GPUS = {gpu.label: gpu for gpu in runtime.GPUS}
TINY = GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32, bias=False, pos_emb="rope",
                 norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False)


def test_the_table_has_a_row_per_card_with_what_runtime_picks_there(capsys):
    rows = estimates["main"](["--cards", "T4,A100 80GB"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| card | dtype | packed finetuning | micro-batch") and len(table) == 4
    assert table[2].startswith("| T4 (sm75, 15 GiB) | float16 | dense mask | ")
    assert table[3].startswith("| A100 80GB (sm80, 79 GiB) | bfloat16 | FlexAttention | ")
    for row in rows:  # every GPU step of the pipeline, from the steps pipeline.py builds for the preset
        assert set(row["hours"]) == {"pretrain", "finetune", "evaluate", "evaluate_pretrained_0shot",
                                     "evaluate_pretrained_3shot", "evaluate_pretrained_gpt2", "total"}
        # GPT-2's protocol scores CNN/DM alone, 100 tokens a summary: less than a zero-shot run of every task
        assert row["hours"]["evaluate_pretrained_gpt2"] < row["hours"]["evaluate_pretrained_0shot"]
        assert all(h > 0 for h in row["hours"].values())
        assert row["hours"]["total"] == pytest.approx(sum(h for k, h in row["hours"].items() if k != "total"))
        for step, sequences in (("pretrain", 128), ("finetune", 64)):  # 131,072 and 65,536 tokens per step
            batch, memory = row["micro_batch"][step], row["memory"][step]
            assert sequences % batch == 0
            assert memory["static"] + batch * memory["per_sequence"] <= memory["budget"]
            larger = [b for b in range(batch + 1, sequences + 1) if sequences % b == 0]
            assert not larger or memory["static"] + larger[0] * memory["per_sequence"] > memory["budget"]


def test_the_saved_bytes_measured_on_fake_tensors_are_those_real_tensors_save():
    """The measurement runs the model's real graph without arithmetic: on a tiny model it counts the same
    bytes as real tensors do, and the bytes grow by the same amount per sequence."""
    def real_saved_bytes(batch, dtype):
        torch.manual_seed(0)
        model = GPT(TINY)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.zeros(batch, TINY.block_size, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=dtype):
            model(x, targets=x)
        return sum(storages.values())

    for dtype in (torch.bfloat16, torch.float16):
        per_sequence, fixed = estimates["activation_bytes"](TINY, dtype)
        assert per_sequence > 0 and fixed > 0  # fixed: the weights' autocast copies
        for batch in (1, 3):
            assert estimates["saved_bytes"](TINY, dtype, batch) == real_saved_bytes(batch, dtype)
            assert real_saved_bytes(batch, dtype) == fixed + batch * per_sequence
    # finetuning sends only the loss positions through the output layer: less per sequence
    assert estimates["activation_bytes"](TINY, torch.bfloat16, 0.12)[0] < per_sequence


def test_more_memory_never_fits_a_smaller_micro_batch_and_faster_cards_take_fewer_hours():
    steps, _ = estimates["preset_steps"]()
    runs = estimates["training_steps"](steps)
    model, _ = estimates["fake_model"](runs[0].cfg.model_fields())
    t4 = GPUS["T4"]
    for run in runs:
        batches = [estimates["micro_batch"](dataclasses.replace(t4, memory_gib=gib), model, run, torch.float16)[0]
                   for gib in (4, 8, 15, 24, 48, 96, 192)]
        assert batches == sorted(batches) and batches[0] < batches[-1] == run.sequences_per_step
        hours, rates = estimates["training_hours"], estimates["card_rates"]
        assert hours(rates(dataclasses.replace(t4, peak_flops=2 * t4.peak_flops), model), model, run, 8) == \
            pytest.approx(hours(rates(t4, model), model, run, 8) / 2)
        assert hours(rates(t4, model, gpus=8), model, run, 8) == pytest.approx(hours(rates(t4, model), model, run, 8) / 8)
    args = estimates["evaluate"].parse_args(steps["evaluate"])
    evaluation = [estimates["evaluation_hours"](estimates["card_rates"](card, model), card, model, args)
                  for card in (dataclasses.replace(t4, bandwidth=bw) for bw in (0.1e12, 0.3e12, 1e12, 3e12))]
    assert evaluation == sorted(evaluation, reverse=True) and evaluation[0] > evaluation[-1]
    totals = [estimates["estimate"](GPUS[label])["hours"]["total"] for label in ("T4", "A10G", "A100 80GB", "H100")]
    assert totals == sorted(totals, reverse=True)
