"""Hugging Face transformers interop: export a GPT as a transformers model folder, and import
one (OpenAI's GPT-2 from the hub, or a local folder) as a checkpoint dict of this toolkit.

Each recipe maps to the transformers class that computes exactly the same function:
    learned positions, LayerNorm, GELU / ReLU^2        -> GPT2LMHeadModel
    RoPE, RMSNorm, SwiGLU                              -> LlamaForCausalLM
    RoPE, RMSNorm, SwiGLU, QK-norm, no biases          -> Qwen3ForCausalLM
Other combinations (RoPE with LayerNorm, learned positions with RMSNorm, ...) have no such
class and are refused, as is a logit soft-cap. transformers is imported only when needed, so the rest of the toolkit
works without it.
"""
import fnmatch
import json
import math
import os
import shutil
import tempfile

import torch

from common import EOT, UserError
from model import GPT, GPT2_VOCAB, GPTConfig

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's weights on the hub
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# the HF tokenizer files are tiktoken's gpt2 files, byte for byte (its pinned sha256s)
TOKENIZER_FILES = {"vocab.json": ("encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
                   "merges.txt": ("vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")}
# our mlp -> GPT-2's activation_function; import also accepts the other names of tanh GELU
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu2": "relu2"}
GPT2_ACTIVATION_ALIASES = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
# the names an export writes (save_pretrained's, sharded or not, and the tokenizer's) and its unfinished
# temporary folder: a folder holding only these is an earlier export, which --overwrite may replace
EXPORT_NAMES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                *TOKENIZER_FILES, "tokenizer_config.json", ".export-*")
RMS_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default eps for float32 (model.Norm passes none)
LAYERNORM_EPS = 1e-5  # model.Norm's

# Parameter names: (ours, theirs) per module; ".weight" / ".bias" are appended. "{}" in a
# transformers name means our fused attention input is split into its q, k and v rows.
# A tensor our model lacks is the identity: a zero bias (bias=False exported as GPT-2) or a
# unit norm weight (QK-norm has no weight here).
NAMES = {
    "gpt2": {
        "top": [("wte", "transformer.wte"), ("wpe", "transformer.wpe"), ("ln_f", "transformer.ln_f"),
                ("lm_head", "lm_head")],
        "block": "transformer.h.{i}.",
        "layer": [("ln_1", "ln_1"), ("attn.c_attn", "attn.c_attn"), ("attn.c_proj", "attn.c_proj"),
                  ("ln_2", "ln_2"), ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")],
    },
    "llama": {
        "top": [("wte", "model.embed_tokens"), ("ln_f", "model.norm"), ("lm_head", "lm_head")],
        "block": "model.layers.{i}.",
        "layer": [("ln_1", "input_layernorm"), ("attn.c_attn", "self_attn.{}_proj"),
                  ("attn.q_norm", "self_attn.q_norm"), ("attn.k_norm", "self_attn.k_norm"),
                  ("attn.c_proj", "self_attn.o_proj"), ("ln_2", "post_attention_layernorm"),
                  ("mlp.c_gate", "mlp.gate_proj"), ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")],
    },
}
NAMES["qwen3"] = NAMES["llama"]  # Llama's layout; only Qwen3 has the q_norm / k_norm tensors
IGNORED_ON_IMPORT = {"resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "activation_function"}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face export/import needs transformers and safetensors; "
                        "pip install transformers safetensors") from None
    return transformers


def architecture(c):
    """The transformers model_type that computes the same function as GPTConfig c."""
    if c.logit_softcap:  # zero_init_proj is only how training started: it exports as any other model
        raise UserError(f"logit_softcap={c.logit_softcap:g} has no equivalent in GPT-2, Llama or Qwen3 (their logits "
                        f"would not be capped); only a model trained without it exports")
    if c.pos_emb == "learned" and c.norm == "layernorm" and c.mlp in GPT2_ACTIVATIONS and not c.qk_norm:
        return "gpt2"
    if c.pos_emb == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu" and not (c.qk_norm and c.bias):
        return "qwen3" if c.qk_norm else "llama"
    raise UserError(f"no transformers architecture computes pos_emb={c.pos_emb}, norm={c.norm}, mlp={c.mlp}, "
                    f"qk_norm={c.qk_norm}, bias={c.bias}; exportable are GPT-2 (learned, layernorm, "
                    f"gelu|gelu_tanh|relu2), Llama (rope, rmsnorm, swiglu) and Qwen3 (Llama + qk_norm, bias=False)")


def hf_config_fields(c):
    """The transformers config (model_type, fields) of GPTConfig c."""
    arch = architecture(c)
    if c.vocab_size < GPT2_VOCAB:
        raise UserError(f"vocab_size={c.vocab_size} is smaller than GPT-2's {GPT2_VOCAB} tokens; the exported "
                        f"model uses the GPT-2 tokenizer")
    common = dict(vocab_size=GPT2_VOCAB, tie_word_embeddings=c.tie_embeddings, bos_token_id=EOT, eos_token_id=EOT)
    if arch == "gpt2":
        return arch, dict(common, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                          n_inner=None, activation_function=GPT2_ACTIVATIONS[c.mlp], layer_norm_epsilon=LAYERNORM_EPS,
                          resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                          scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)
    fields = dict(common, hidden_size=c.n_embd, intermediate_size=swiglu_hidden(c.n_embd),
                  num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
                  head_dim=c.n_embd // c.n_head, hidden_act="silu", max_position_embeddings=c.block_size,
                  rms_norm_eps=RMS_EPS, rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
                  attention_bias=c.bias, attention_dropout=c.dropout)
    return arch, fields if arch == "qwen3" else dict(fields, mlp_bias=c.bias)


def swiglu_hidden(n_embd):
    """model.MLP's SwiGLU width: 2/3 of 4 * n_embd, rounded up to a multiple of 64."""
    return 64 * math.ceil(4 * n_embd * 2 / 3 / 64)


def name_pairs(arch, n_layer):
    """(our key, [transformers keys], transpose) for every tensor either side may have."""
    names = NAMES[arch]
    modules = [(ours, theirs, False) for ours, theirs in names["top"]]
    for i in range(n_layer):
        prefix = names["block"].format(i=i)
        # GPT-2's Conv1D stores its matrices as (in, out), the transpose of nn.Linear's
        modules += [(f"blocks.{i}.{ours}", prefix + theirs, arch == "gpt2") for ours, theirs in names["layer"]]
    for ours, theirs, conv in modules:
        split = [theirs.format(x) for x in "qkv"] if "{}" in theirs else [theirs]
        yield f"{ours}.weight", [f"{t}.weight" for t in split], conv
        yield f"{ours}.bias", [f"{t}.bias" for t in split], False


def to_hf_state(state, arch, n_layer, hf_state):
    """Our state dict as the transformers model's (hf_state gives its keys and shapes)."""
    out, used = {}, set()
    for ours, theirs, conv in name_pairs(arch, n_layer):
        if theirs[0] not in hf_state:
            continue
        used.add(ours)
        t = state.get(ours)
        if t is None:  # the identity: no bias, or a norm without weight
            for key in theirs:
                out[key] = (torch.zeros_like if key.endswith(".bias") else torch.ones_like)(hf_state[key])
            continue
        if ours in ("wte.weight", "lm_head.weight"):
            t = t[:GPT2_VOCAB]  # drop the padding rows
        t = t.t() if conv and t.dim() == 2 else t
        for key, part in zip(theirs, t.chunk(len(theirs))):
            out[key] = part.contiguous().clone()
    if set(state) - used:  # a parameter added to model.py without its row in NAMES
        raise RuntimeError(f"hf.NAMES has no transformers name for {sorted(set(state) - used)[:3]}")
    return out


def from_hf_state(hf_state, arch, n_layer, own_keys, source):
    """A transformers state dict as ours; a tensor we have no place for must be the identity."""
    state = {}
    for ours, theirs, conv in name_pairs(arch, n_layer):
        if theirs[0] not in hf_state:
            continue
        t = torch.cat([hf_state[key] for key in theirs])
        if ours not in own_keys:
            identity = torch.zeros_like(t) if ours.endswith(".bias") else torch.ones_like(t)
            if not torch.equal(t, identity):
                raise UserError(f"{source}: {theirs[0]} is not {'zero' if ours.endswith('.bias') else 'one'} "
                                f"everywhere, and this toolkit's model has no such parameter")
            continue
        state[ours] = t.t().contiguous() if conv and t.dim() == 2 else t
    return state


def gpt_config_of(hf_config, source):
    """The GPTConfig whose export would be hf_config; anything export would write differently
    (an epsilon, a RoPE scaling, grouped keys, ...) is a one-line error."""
    arch = hf_config.model_type
    if arch not in NAMES:
        raise UserError(f"{source} is a {arch} model; importable are {', '.join(NAMES)}")
    if arch == "gpt2":
        act = hf_config.activation_function
        mlp = GPT2_ACTIVATION_ALIASES.get(act, {v: k for k, v in GPT2_ACTIVATIONS.items()}.get(act))
        if mlp is None:
            raise UserError(f"{source}: activation_function={act!r} has no equivalent here")
        fields = dict(block_size=hf_config.n_positions, n_layer=hf_config.n_layer, n_head=hf_config.n_head,
                      n_embd=hf_config.n_embd, mlp=mlp)
    else:
        fields = dict(block_size=hf_config.max_position_embeddings, n_layer=hf_config.num_hidden_layers,
                      n_head=hf_config.num_attention_heads, n_embd=hf_config.hidden_size, pos_emb="rope",
                      norm="rmsnorm", mlp="swiglu", qk_norm=arch == "qwen3", bias=hf_config.attention_bias,
                      rope_base=float((hf_config.rope_parameters or {}).get("rope_theta", 0.0)))
    try:
        config = GPTConfig(vocab_size=hf_config.vocab_size, dropout=0.0,
                           tie_embeddings=bool(hf_config.tie_word_embeddings), **fields)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    for key, ours in hf_config_fields(config)[1].items():
        theirs = getattr(hf_config, key, None)
        numbers = isinstance(ours, float) and isinstance(theirs, (int, float))
        if key not in IGNORED_ON_IMPORT and not (math.isclose(theirs, ours) if numbers else theirs == ours):
            raise UserError(f"{source}: {key}={theirs!r} has no equivalent in this toolkit's model "
                            f"(it would need {ours!r})")
    return config


def import_checkpoint(source):
    """A checkpoint dict ("model", "model_config") from a transformers folder or a GPT-2 name,
    for checkpoint.model_from_checkpoint."""
    hf_model = load_hf_model(source)
    config = gpt_config_of(hf_model.config, source)
    with torch.device("meta"):  # only its parameter names: no memory, no init
        own_keys = set(GPT(config).state_dict())
    hf_state = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    state = from_hf_state(hf_state, hf_model.config.model_type, config.n_layer, own_keys, source)
    return {"model": state, "model_config": vars(config)}


def load_hf_model(source):
    transformers = _transformers()
    local = os.path.isdir(source)
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            source if local else f"openai-community/{source}", dtype=torch.float32)
    except Exception as e:  # missing files, offline hub and bad configs come in many types
        if local:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load the Hugging Face model in {source} ({reason})") from None
        raise UserError(f"cannot download {source} from the Hugging Face hub ({type(e).__name__}); offline, "
                        f"fetch it on a connected machine (hf download openai-community/{source} "
                        f"--local-dir DIR), copy DIR here and pass init_from=DIR") from None


def write_tokenizer(out_dir, block_size):
    """vocab.json and merges.txt (tiktoken's cached gpt2 files, fetched if not cached) and a
    tokenizer_config.json that names the GPT-2 tokenizer whatever the model class."""
    from tiktoken.load import read_file_cached
    for name, (remote, sha256) in TOKENIZER_FILES.items():
        try:
            data = read_file_cached(TIKTOKEN_URL + remote, sha256)
        except Exception as e:  # network errors come in many types
            raise UserError(f"cannot read tiktoken's gpt2 {remote} ({type(e).__name__}); offline, set "
                            f"TIKTOKEN_CACHE_DIR to a folder with tiktoken's gpt2 files (e.g. ../shared/tiktoken)")
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    eot = "<|endoftext|>"
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
                   "model_max_length": block_size, "add_prefix_space": False}, f, indent=2)


def is_export_file(name):
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in EXPORT_NAMES)


def check_export_folder(out_dir, overwrite=False):
    """An export goes into a new or empty folder, or over an earlier export (with overwrite): never
    among other files, such as a run's checkpoints and report."""
    if not os.path.isdir(out_dir):
        if os.path.exists(out_dir):
            raise UserError(f"--out {out_dir} is a file, not a folder; choose a new folder, e.g. {out_dir}_hf")
        return
    names = sorted(os.listdir(out_dir))
    others = [n for n in names if not is_export_file(n)]
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserError(f"--out {out_dir} holds other files ({shown}); export into a new or empty folder, "
                        f"e.g. --out {os.path.join(out_dir, 'hf')}")
    if names and not overwrite:
        raise UserError(f"--out {out_dir} holds an earlier export; pass --overwrite to replace it, or choose "
                        f"a new folder")


def export(model, out_dir):
    """Write model (our GPT) as a transformers folder: config.json, model.safetensors,
    generation_config.json and the GPT-2 tokenizer. Each file replaces its old version whole, and
    the files of an earlier export that this one does not write (other shards) are removed."""
    c = model.config
    arch, fields = hf_config_fields(c)
    transformers = _transformers()
    hf_config = transformers.AutoConfig.for_model(arch, **fields)
    if arch != "gpt2":
        hf_config.rope_theta = c.rope_base  # where transformers 4 (and tools on it) read the base
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    hf_state = hf_model.state_dict()
    hf_model.load_state_dict(to_hf_state(model.state_dict(), arch, c.n_layer, hf_state), strict=True)
    hf_model.generation_config = transformers.GenerationConfig(bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        hf_model.save_pretrained(tmp)
        write_tokenizer(tmp, c.block_size)
        written = sorted(os.listdir(tmp))
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        for name in os.listdir(out_dir):
            path = os.path.join(out_dir, name)
            if name not in written and is_export_file(name) and os.path.isfile(path):
                os.remove(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return arch
