"""Recipe v2's components: zero-initialized output projections, a logit soft-cap, ReLU^2 at 4x
width, Muon per Q/K/V block, Polar Express, Muon's own weight decay, clipping only AdamW's
parameters (each off by default) and a warmup-stable-decay schedule (pretraining's default, the
ablation's one confirmed win); runs with them resume exactly, and checkpoints from before them
load as they ran."""
import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

import train
import trainer
from checkpoint import model_from_checkpoint, model_record
from common import UserError
from config import FinetuneConfig, TrainConfig, parse_config
from generation import CompiledDecoding, _static_step
from model import GPT, GPTConfig
from muon import Muon, newton_schulz

from conftest import TINY, stopped_and_resumed

C = 32
V2_FLAGS = ["--optimizer=muon", "--mlp=relu2", "--zero_init_proj=true", "--logit_softcap=15", "--muon_split_qkv=true",
            "--muon_ns=polar_express", "--muon_weight_decay=0", "--clip_muon=false", "--lr_schedule=wsd",
            "--cooldown_frac=0.5"]


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=C, **kw)).eval()


def optimizers(model, *argv):
    cfg = parse_config(TrainConfig, list(argv))
    return trainer.build_optimizers(model, cfg, SimpleNamespace(plan=SimpleNamespace(fused_adamw=False)))


def test_only_the_confirmed_component_is_on_by_default():
    cfg = parse_config(TrainConfig, ["config/pretrain_cpu.py"])
    assert (cfg.mlp, cfg.zero_init_proj, cfg.logit_softcap, cfg.muon_split_qkv, cfg.muon_ns, cfg.muon_weight_decay,
            cfg.clip_muon) == ("swiglu", False, 0.0, False, "quintic", -1.0, True)
    assert (cfg.lr_schedule, cfg.cooldown_frac) == ("wsd", 0.4)  # the one that beat cosine beyond the seeds' spread
    # finetuning was not part of the ablation, and the GPT-2 recipe's overlay keeps nanoGPT's cosine
    assert parse_config(FinetuneConfig, ["config/finetune_cpu.py"]).lr_schedule == "cosine"
    assert parse_config(TrainConfig, ["config/pretrain_cpu.py", "config/gpt2_classic.py"]).lr_schedule == "cosine"


# --- the model ---------------------------------------------------------------------------------

def test_zero_init_projections_start_at_zero_and_every_other_weight_as_without():
    plain, zero = tiny(), tiny(zero_init_proj=True)
    projections = {n for n in dict(zero.named_parameters()) if n.endswith("c_proj.weight")}
    assert len(projections) == 4  # attention's and the MLP's, in each of 2 blocks
    for name, p in zero.named_parameters():
        same = torch.equal(p, dict(plain.named_parameters())[name])
        assert (not p.any() and not same) if name in projections else same, name
    # every block starts as the identity: the logits are the embedding's, through the final norm
    x = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        logits, _ = zero(x, all_logits=True)
        assert torch.allclose(logits, zero.head(zero.ln_f(zero.wte(x) + zero.wpe(torch.arange(8)))), atol=1e-6)
    # and the projections learn from the first step
    zero.train()
    _, loss = zero(x, targets=x)
    loss.backward()
    opt = torch.optim.AdamW(zero.parameters(), lr=1e-3)
    opt.step()
    assert all(dict(zero.named_parameters())[n].any() for n in projections)


def test_soft_capped_logits_stay_within_the_cap_in_training_and_inference():
    capped, plain = tiny(logit_softcap=5.0), tiny()
    with torch.no_grad():
        for model in (capped, plain):
            model.lm_head.weight.mul_(300)  # logits far beyond the cap
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        raw, _ = plain(x, all_logits=True)
        logits, _ = capped(x, all_logits=True)
        _, loss = capped(x, targets=x)
    assert raw.abs().max() > 20 and logits.abs().max() <= 5.0 and logits.abs().max() > 4.5
    assert torch.allclose(logits, 5.0 * torch.tanh(raw / 5.0), atol=1e-5)
    # the loss is computed on the capped logits
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits.view(-1, 512), x.view(-1)), atol=1e-5)
    # decoding: the cached steps, the uncached ones and generation.compile_decoding's static step agree
    prompts = [[5, 6, 7, 8], [9, 10]]
    cached = capped.generate(prompts, 12, stop_tokens=())
    assert cached == capped.generate(prompts, 12, stop_tokens=(), use_cache=False)
    static = copy.deepcopy(capped)
    static.compiled_decoding = CompiledDecoding()
    static.compiled_decoding.step = _static_step  # the compiled function's Python, eager: seconds, not a compile
    assert static.generate(prompts, 12, stop_tokens=()) == cached


def test_relu2_is_two_matrices_at_4x_width():
    relu2, gelu = tiny(mlp="relu2", bias=False), tiny(mlp="gelu", bias=False)
    mlp = relu2.blocks[0].mlp
    assert mlp.c_fc.weight.shape == (4 * C, C) and mlp.c_proj.weight.shape == (C, 4 * C)
    assert sum(p.numel() for p in mlp.parameters()) == 8 * C * C
    assert relu2.num_params() == gelu.num_params()


def relu2_softcap_step(model, x):
    """One training step's loss and gradients; records the dtype of the MLP's hidden layer."""
    hidden = []
    hook = model.blocks[0].mlp.c_proj.register_forward_hook(lambda m, args, out: hidden.append(args[0].dtype))
    _, loss = model(x, targets=x)
    loss.backward()
    hook.remove()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, hidden


@pytest.mark.parametrize("dtype, loss_tolerance, grad_tolerance", [(torch.bfloat16, 0.01, 0.05),
                                                                  (torch.float16, 0.001, 0.01)])
def test_relu2_with_the_softcap_trains_under_autocast_in_the_autocast_dtype(dtype, loss_tolerance, grad_tolerance):
    """The CPU stand-in for a GPU's autocast: the 4C-wide hidden layer stays in the low precision
    (no float32 copy of it), and the loss and gradients stay those of float32."""
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = relu2_softcap_step(tiny(mlp="relu2", logit_softcap=15.0).train(), x)
    with torch.autocast("cpu", dtype=dtype):
        loss, grads, hidden = relu2_softcap_step(tiny(mlp="relu2", logit_softcap=15.0).train(), x)
    assert reference[2] == [torch.float32] and hidden == [dtype]
    assert loss == pytest.approx(reference[0], abs=loss_tolerance)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        scale = reference[1][name].abs().max()
        assert torch.allclose(grad.float(), reference[1][name], atol=grad_tolerance * scale), name


def test_relu2_with_the_softcap_compiles_to_the_eager_loss_and_gradients():
    """torch.compile on the CPU, the stand-in for the GPU presets' compile=true."""
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    eager_loss, eager_grads, _ = relu2_softcap_step(tiny(mlp="relu2", logit_softcap=15.0).train(), x)
    compiled = tiny(mlp="relu2", logit_softcap=15.0).train()
    _, loss = torch.compile(compiled)(x, targets=x)
    loss.backward()
    assert loss.item() == pytest.approx(eager_loss, abs=1e-5)
    for name, p in compiled.named_parameters():
        assert torch.allclose(p.grad, eager_grads[name], atol=1e-5), name


@pytest.mark.parametrize("argv, message", [
    (["--logit_softcap=-1"], "logit_softcap=-1.0 must be >= 0"),
    (["--lr_schedule=step"], "lr_schedule='step'; choose one of"),
    (["--cooldown_frac=0"], r"cooldown_frac=0.0 must be in \(0, 1\]"),
    (["--muon_ns=cubic"], "muon_ns='cubic'; choose one of"),
    (["--muon_weight_decay=-0.5"], "muon_weight_decay=-0.5 must be >= 0, or -1"),
])
def test_bad_component_settings_are_one_line_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_config(TrainConfig, argv)


def test_a_checkpoint_from_before_the_components_loads_as_it_ran():
    model = tiny(pos_emb="rope", norm="rmsnorm", mlp="swiglu")
    record = model_record(model, TrainConfig())
    for key in ("zero_init_proj", "logit_softcap"):
        del record["model_config"][key]
    loaded = model_from_checkpoint(record, "old.pt").eval()
    assert loaded.config == model.config
    x = torch.randint(0, 512, (2, 8))
    assert torch.equal(loaded(x, all_logits=True)[0], model(x, all_logits=True)[0])


# --- Muon ---------------------------------------------------------------------------------------

def test_muon_split_orthogonalizes_each_qkv_block_unlike_the_fused_matrix():
    torch.manual_seed(0)
    # Q, K and V gradients of unequal size, each with singular values spread over 5x
    grad = torch.cat([torch.linalg.qr(torch.randn(C, C))[0] * torch.linspace(0.2, 1.0, C) * scale
                      for scale in (10.0, 1.0, 0.1)])

    def update(blocks):
        w = torch.nn.Parameter(torch.zeros(3 * C, C))
        w.grad = grad.clone()
        Muon([{"params": [w], "blocks": blocks}], lr=1.0, momentum=0.0, weight_decay=0.0).step()
        return [torch.linalg.svdvals(-block) for block in w.detach().chunk(3)]

    for s in update(3):  # each block as its own matrix: every singular value near 1, scale 1 (C x C)
        assert s.min() > 0.6 and s.max() < 1.2
    fused = update(1)  # one matrix: V's directions drown in Q's
    assert fused[2].max() < 0.3 and min(s.min() for s in fused) < 0.1


def test_build_optimizers_gives_the_qkv_matrices_their_own_group_and_muon_its_own_decay():
    model = tiny(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
    qkv = {id(b.attn.c_attn.weight) for b in model.blocks}
    muon, adamw = optimizers(model)
    assert [g["blocks"] for g in muon.param_groups] == [1]
    assert muon.param_groups[0]["weight_decay"] == 0.1 == adamw.param_groups[0]["weight_decay"]
    muon, adamw = optimizers(model, "--muon_split_qkv=true", "--muon_weight_decay=0", "--muon_ns=polar_express")
    plain, split = muon.param_groups
    assert {id(p) for p in split["params"]} == qkv and split["blocks"] == 3
    assert not qkv & {id(p) for p in plain["params"]} and len(plain["params"]) == 4 * len(model.blocks)  # c_proj, SwiGLU's three
    assert all(g["weight_decay"] == 0.0 and g["ns_variant"] == "polar_express" for g in muon.param_groups)
    assert adamw.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (32, 32)])
def test_polar_express_ends_nearer_orthogonal_than_the_quintic(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape) * 3.0
    quintic, polar = (torch.linalg.svdvals(newton_schulz(G, variant=v)) for v in ("quintic", "polar_express"))
    assert (polar - 1).abs().max() < 0.15 < (quintic - 1).abs().max()
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)  # the same directions: U V^T, near
    assert (newton_schulz(G, variant="polar_express") * (U @ Vh)).sum() / (U @ Vh).norm() ** 2 > 0.95


def test_a_muon_state_from_before_the_group_settings_loads_as_it_ran():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    old = Muon([w])
    w.grad = torch.randn(8, 4)
    old.step()
    state = copy.deepcopy(old.state_dict())
    for group in state["param_groups"]:
        del group["blocks"], group["ns_variant"]
    twin = torch.nn.Parameter(w.detach().clone())
    resumed = Muon([twin])
    resumed.load_state_dict(state)
    assert resumed.param_groups[0]["blocks"] == 1 and resumed.param_groups[0]["ns_variant"] == "quintic"
    w.grad = twin.grad = torch.randn(8, 4)
    old.step()
    resumed.step()
    assert torch.equal(w, twin)


# --- the schedule and the training loop ----------------------------------------------------------

def test_wsd_warms_up_stays_flat_then_decays_linearly_to_min_lr():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, lr_schedule="wsd",
                      cooldown_frac=0.2)
    lrs = [trainer.lr_at(i, cfg, 1.0) for i in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # warmup, as cosine's
    assert lrs[9:89] == [1.0] * 80  # flat until the last 20% (22 steps) of 110
    steps = [a - b for a, b in zip(lrs[88:110], lrs[89:111])]
    assert steps == pytest.approx([0.9 / 22] * 22)  # linear, reaching min_lr at max_iters
    assert lrs[110:] == [pytest.approx(0.1)] * 10
    # Muon's rate follows the same shape from its own peak (min_lr scaled alike)
    assert trainer.lr_at(100, cfg, 0.02) == pytest.approx(0.02 * lrs[100])
    # more steps move only the cooldown: the rates before it stay
    longer = dataclasses.replace(cfg, max_iters=200)
    assert [trainer.lr_at(i, longer, 1.0) for i in range(89)] == lrs[:89]
    # lr_decay_iters bounds the decay span as for cosine
    assert trainer.lr_at(50, dataclasses.replace(cfg, lr_decay_iters=50), 1.0) == pytest.approx(0.1)


def test_a_run_with_every_component_resumed_under_wsd_ends_bit_identical(corpus, monkeypatch):
    args = TINY + V2_FLAGS + [f"--data_dir={corpus}", "--max_iters=12", "--eval_interval=4"]
    train.main(args + [f"--out_dir={corpus}/full"])
    full = torch.load(corpus / "full" / "ckpt.pt", weights_only=False)
    assert full["model_config"]["logit_softcap"] == 15.0 and full["config"]["lr_schedule"] == "wsd"
    cut = stopped_and_resumed(monkeypatch, args, corpus / "cut", 5)  # stopped while flat: the cooldown is 6 to 12
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])


def test_resuming_with_another_muon_layout_or_variant_is_a_clear_error(corpus):
    args = TINY + ["--optimizer=muon", f"--data_dir={corpus}", f"--out_dir={corpus}/o"]
    train.main(args + ["--max_iters=2", "--muon_split_qkv=true"])
    with pytest.raises(UserError, match=r"was trained with muon_split_qkv=True, not False; resume it with "
                                        r"--muon_split_qkv=True"):
        train.main(args + ["--max_iters=4", "--resume"])
    with pytest.raises(UserError, match=r"was trained with muon_ns=quintic, not polar_express"):
        train.main(args + ["--max_iters=4", "--resume", "--muon_split_qkv=true", "--muon_ns=polar_express"])


@pytest.mark.parametrize("started, resumed, message", [
    # no weights differ: only the check stands between these and a silently different run
    (["--logit_softcap=15"], [], r"logit_softcap=15.0, not 0.0; resume it with --logit_softcap=15.0"),
    (["--mlp=relu2", "--pos_emb=learned"], ["--mlp=gelu", "--pos_emb=learned"], r"mlp=relu2, not gelu"),
    (["--lr_schedule=cosine"], [], r"lr_schedule=cosine, not wsd; resume it with --lr_schedule=cosine"),
    (["--lr_schedule=wsd"], ["--lr_schedule=wsd", "--cooldown_frac=0.2"], r"cooldown_frac=0.4, not 0.2"),
])
def test_resuming_with_another_function_or_schedule_is_a_clear_error(corpus, started, resumed, message):
    args = TINY + [f"--data_dir={corpus}", f"--out_dir={corpus}/o"]
    train.main(args + ["--max_iters=2", *started])
    with pytest.raises(UserError, match=message):
        train.main(args + ["--max_iters=4", "--resume", *resumed])
    train.main(args + ["--max_iters=4", "--resume", *started, "--dropout=0.1"])  # dropout may change


def test_finetuning_keeps_the_pretrained_models_function(tmp_path):
    """An explicit field that contradicts the checkpoint is refused even where the weights would load."""
    from checkpoint import pretrained_model
    torch.save(model_record(tiny(mlp="relu2", logit_softcap=15.0), TrainConfig()), tmp_path / "p.pt")
    for extra, message in ((["--mlp=gelu"], "trained with mlp=relu2, not gelu"),
                           (["--logit_softcap=0"], "trained with logit_softcap=15.0, not 0.0")):
        cfg = parse_config(FinetuneConfig, [f"--init_from={tmp_path}/p.pt", *extra])
        with pytest.raises(UserError, match=f"does not fit the configured model: it was {message}; drop "):
            pretrained_model(cfg)
    cfg = parse_config(FinetuneConfig, [f"--init_from={tmp_path}/p.pt", "--dropout=0.1", "--mlp=relu2"])
    model = pretrained_model(cfg)  # agreeing fields and dropout are fine, and the rest comes from the checkpoint
    assert (model.config.dropout, model.config.logit_softcap, cfg.mlp) == (0.1, 15.0, "relu2")


@pytest.mark.parametrize("clip_muon", [True, False])
def test_clip_muon_false_clips_only_the_adamw_parameters(corpus, monkeypatch, clip_muon):
    clipped = []
    real = torch.nn.utils.clip_grad_norm_

    def record(params, max_norm):
        params = list(params)
        clipped.append({id(p) for p in params})
        return real(params, max_norm)

    built, original = [], trainer.build_optimizers
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    monkeypatch.setattr(trainer, "build_optimizers", lambda *a: built.append(original(*a)) or built[-1])
    train.main(TINY + ["--optimizer=muon", f"--clip_muon={clip_muon}", f"--data_dir={corpus}",
                       f"--out_dir={corpus}/o", "--max_iters=1"])
    muon, adamw = built[0]
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert clipped and clipped[0] == (in_muon | in_adamw if clip_muon else in_adamw)
