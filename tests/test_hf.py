"""Hugging Face interop: every exportable recipe loads in transformers and computes the same
logits and greedy continuation; a recipe no transformers class computes is refused in one line;
GPT-2 weights import exactly, and training and finetuning start from them. Nothing is downloaded."""
import json
import subprocess
import sys

import pytest
import tiktoken
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import export_hf
import finetune
import hf
import prepare_finetune
import train
from checkpoint import model_from_checkpoint
from common import EOT, UserError
from model import GPT, GPT2_VOCAB, GPTConfig

from conftest import ROOT

MODERN = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False, bias=False)
LLAMA = dict(MODERN, qk_norm=False)
# variant -> (GPTConfig options, the transformers class it becomes)
EXPORTABLE = {
    "gpt2": ({}, "GPT2LMHeadModel"),
    "gpt2, no biases, untied": (dict(bias=False, tie_embeddings=False), "GPT2LMHeadModel"),
    "gpt2, tanh gelu": (dict(mlp="gelu_tanh"), "GPT2LMHeadModel"),
    "gpt2, relu2": (dict(mlp="relu2", bias=False), "GPT2LMHeadModel"),
    "llama": (dict(LLAMA, rope_base=500.0), "LlamaForCausalLM"),
    "llama, biases, tied": (dict(LLAMA, bias=True, tie_embeddings=True), "LlamaForCausalLM"),
    "modern (qwen3)": (MODERN, "Qwen3ForCausalLM"),
    "modern (qwen3), tied": (dict(MODERN, tie_embeddings=True), "Qwen3ForCausalLM"),
}
NOT_EXPORTABLE = {
    "rope with layernorm": dict(pos_emb="rope"),
    "learned positions with rmsnorm": dict(norm="rmsnorm"),
    "gpt2 with swiglu": dict(mlp="swiglu"),
    "gpt2 with qk_norm": dict(qk_norm=True),
    "modern with relu2": dict(MODERN, mlp="relu2"),
    "qk_norm with biases": dict(MODERN, bias=True),
}


def randomized(model):
    """Norm weights away from 1 and biases away from 0, so a mapping mistake cannot hide behind
    them; matrices large enough for logits of order 1, so that tanh GELU vs exact GELU shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def random_gpt(**options):
    torch.manual_seed(0)
    return randomized(GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, **options)))


def save_ckpt(model, path):
    torch.save({"model": model.state_dict(), "model_config": vars(model.config)}, path)
    return path


def greedy_hf(hf_model, prompt, n):
    """transformers' own greedy generate, without the stop token (as GPT.generate returns it)."""
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(EOT)] if EOT in new else new


@pytest.mark.parametrize("variant", EXPORTABLE)
def test_exported_model_computes_the_same_logits_and_continuation(variant, tmp_path):
    options, hf_class = EXPORTABLE[variant]
    model = random_gpt(**options)
    export_hf.main(["--ckpt", str(save_ckpt(model, tmp_path / "model.pt")), "--out", str(tmp_path / "hf")])
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model).__name__ == hf_class
    x = torch.randint(0, GPT2_VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(x, all_logits=True)
        theirs = hf_model(x).logits
    assert theirs.shape == (2, 48, GPT2_VOCAB)  # the padded vocabulary is cut
    assert (ours[..., :GPT2_VOCAB] - theirs).abs().max() < 1e-4
    prompt = x[0, :12].tolist()
    assert greedy_hf(hf_model, prompt, 24) == model.generate([prompt], 24)[0]


def test_exported_folder_has_the_gpt2_tokenizer_and_generation_settings(tmp_path):
    export_hf.main(["--ckpt", str(save_ckpt(random_gpt(**MODERN), tmp_path / "m.pt")), "--out", str(tmp_path / "hf")])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = tiktoken.get_encoding("gpt2")
    for text in ["Hello world", "  naïve café\n\n\tit's 2024 <|endoftext|> ok", "🦊 x    y\r\n"]:
        ids = enc.encode(text, allowed_special="all")
        assert tokenizer(text).input_ids == ids and tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == EOT and tokenizer.model_max_length == 64
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == EOT and generation["bos_token_id"] == EOT


@pytest.mark.parametrize("variant", NOT_EXPORTABLE)
def test_a_recipe_no_transformers_class_computes_is_refused_by_name(variant, tmp_path):
    model = random_gpt(**NOT_EXPORTABLE[variant])
    c = model.config
    named = f"pos_emb={c.pos_emb}, norm={c.norm}, mlp={c.mlp}, qk_norm={c.qk_norm}, bias={c.bias}"
    with pytest.raises(UserError, match=f"no transformers architecture computes {named};"):
        hf.export(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_goes_only_into_a_new_or_empty_folder_or_over_its_own_earlier_export(tmp_path):
    ckpt = str(save_ckpt(random_gpt(**MODERN), tmp_path / "model.pt"))
    (tmp_path / "empty").mkdir()
    export_hf.main(["--ckpt", ckpt, "--out", str(tmp_path / "empty")])
    first = sorted(p.name for p in (tmp_path / "empty").iterdir())
    assert "model.safetensors" in first and "config.json" in first
    with pytest.raises(UserError, match="holds an earlier export; pass --overwrite to replace it"):
        export_hf.main(["--ckpt", ckpt, "--out", str(tmp_path / "empty")])
    (tmp_path / "empty" / "model-00002-of-00002.safetensors").write_bytes(b"a stale shard of a larger export")
    export_hf.main(["--ckpt", ckpt, "--out", str(tmp_path / "empty"), "--overwrite"])
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == first  # the stale shard is gone
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "empty") is not None
    # a run folder: its report and checkpoint stay untouched, with or without --overwrite
    (tmp_path / "REPORT.md").write_text("# my run")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(UserError, match=r"holds other files \(REPORT.md, empty, model.pt\); export into a new "
                                            r"or empty folder, e.g. --out .*/hf"):
            export_hf.main(["--ckpt", ckpt, "--out", str(tmp_path), *extra])
    assert not (tmp_path / "config.json").exists() and (tmp_path / "REPORT.md").read_text() == "# my run"


def test_a_soft_capped_model_is_refused_and_zero_init_changes_nothing_to_export(tmp_path):
    with pytest.raises(UserError, match=r"^logit_softcap=15 has no equivalent in GPT-2, Llama or Qwen3"):
        hf.export(random_gpt(logit_softcap=15.0), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert hf.architecture(GPTConfig(zero_init_proj=True)) == "gpt2"


@pytest.mark.parametrize("case", ["missing checkpoint", "relu2 with rope"])
def test_export_script_errors_are_one_line_with_status_2(case, tmp_path):
    ckpt = tmp_path / "missing.pt"
    if case == "relu2 with rope":
        ckpt = save_ckpt(random_gpt(**dict(MODERN, mlp="relu2")), tmp_path / "relu2.pt")
    run = subprocess.run([sys.executable, "export_hf.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    expected = "not found" if case == "missing checkpoint" else "no transformers architecture computes"
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and expected in run.stderr


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A randomly initialised GPT2LMHeadModel as from_pretrained saves it: OpenAI's GPT-2 layout
    and activation (tanh GELU), at a tiny size."""
    torch.manual_seed(0)
    config = GPT2Config(n_positions=256, n_embd=32, n_layer=2, n_head=2)
    path = tmp_path_factory.mktemp("gpt2")
    randomized(GPT2LMHeadModel(config)).save_pretrained(path)
    return path


def test_imported_gpt2_computes_the_same_logits(gpt2_dir):
    model = model_from_checkpoint(hf.import_checkpoint(str(gpt2_dir)), str(gpt2_dir)).eval()
    assert (model.config.mlp, model.config.vocab_size, model.config.block_size) == ("gelu_tanh", GPT2_VOCAB, 256)
    hf_model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    x = torch.randint(0, GPT2_VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(x, all_logits=True)[0] - hf_model(x).logits).abs().max() < 1e-4


def test_a_model_round_trips_through_a_hugging_face_folder(tmp_path):
    model = random_gpt(**MODERN)
    hf.export(model, tmp_path / "hf")
    back = hf.import_checkpoint(str(tmp_path / "hf"))
    assert back["model_config"] == {**vars(model.config), "vocab_size": GPT2_VOCAB}
    assert all(torch.equal(back["model"][k], v[:GPT2_VOCAB]) for k, v in model.state_dict().items())


def test_hub_name_offline_says_to_pass_a_local_folder():
    with pytest.raises(UserError, match="cannot download gpt2-medium .*pass init_from=DIR"):
        hf.import_checkpoint("gpt2-medium")


def test_a_start_that_is_no_checkpoint_folder_or_gpt2_name_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="init_from='gtp2' is not a .pt checkpoint, a Hugging Face model folder"):
        train.main(["--init_from=gtp2", f"--out_dir={tmp_path}"])
    with pytest.raises(UserError, match=f"cannot load the Hugging Face model in {tmp_path}"):
        train.main([f"--init_from={tmp_path}", f"--out_dir={tmp_path}"])


def test_the_toolkit_runs_without_transformers_until_a_hugging_face_model_is_read():
    code = "import sys, hf, checkpoint, train, finetune, export_hf; print('transformers' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.stdout.strip() == "False", run.stderr


def test_folder_of_a_model_this_toolkit_cannot_compute_is_refused(tmp_path):
    config = GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2, layer_norm_epsilon=1e-6)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="layer_norm_epsilon=1e-06 has no equivalent"):
        hf.import_checkpoint(str(tmp_path))


@pytest.fixture(scope="module")
def sst2(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("tasks")
    prepare_finetune.main(["--data-root", str(shared_data), "--out-dir", str(out), "--tasks", "sst2",
                           "--block-size", "256", "--limit", "40", "--num-proc", "1"])
    return out


def close_to_import(ckpt_path, gpt2_dir, atol):
    start = hf.import_checkpoint(str(gpt2_dir))
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["model_config"] == start["model_config"]
    return all(torch.allclose(ckpt["model"][k], v, atol=atol) for k, v in start["model"].items())


def test_finetuning_starts_from_a_hugging_face_folder(gpt2_dir, sst2, tmp_path):
    finetune.main(["config/finetune_smoke.py", f"--init_from={gpt2_dir}", f"--finetune_dir={sst2}", "--tasks=sst2",
                   f"--out_dir={tmp_path}", "--replay_fraction=0", "--max_iters=2", "--eval_interval=2",
                   "--eval_iters=1", "--learning_rate=1e-4", "--min_lr=1e-5"])
    # two AdamW steps at 1e-4 move each weight by about 2e-4; a fresh init is ~0.02 away
    assert close_to_import(tmp_path / "ckpt.pt", gpt2_dir, atol=1e-3)
    assert not close_to_import(tmp_path / "ckpt.pt", gpt2_dir, atol=1e-6)


def test_pretraining_starts_from_a_hugging_face_folder_whose_shape_explicit_options_must_match(gpt2_dir, corpus):
    # AdamW, whose one small step keeps every weight near GPT-2's (Muon's 0.02 would move them ~0.02)
    run = [f"--init_from={gpt2_dir}", f"--data_dir={corpus}", f"--out_dir={corpus}/run", "--batch_size=2",
           "--max_iters=1", "--eval_iters=1", "--warmup_iters=1", "--learning_rate=1e-4", "--min_lr=1e-5",
           "--optimizer=adamw"]
    train.main(run)
    assert close_to_import(corpus / "run" / "ckpt.pt", gpt2_dir, atol=1e-3)
    with pytest.raises(UserError, match="does not fit the configured model"):
        train.main(run + ["--n_embd=64", f"--out_dir={corpus}/bad"])
