"""A decoder-only Transformer (GPT), readable top to bottom.

Defaults are the GPT-2 recipe: learned positions, LayerNorm, GELU MLP, tied embeddings.
Modern variants (RoPE, RMSNorm, SwiGLU / ReLU^2, QK-norm, untied head, no biases,
zero-initialized output projections, a logit soft-cap) are config fields, each a few lines at
its natural place, so one file serves every preset.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from common import EOT, check_choices

GPT2_VOCAB = 50257  # real GPT-2 tokens; the embedding is padded to 50304 for fast matmuls


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length in tokens
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # on attention, MLP and embeddings
    bias: bool = True  # biases in linear layers and LayerNorm
    pos_emb: str = "learned"  # learned | rope
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu | gelu_tanh (OpenAI GPT-2's approximation) | swiglu | relu2
    qk_norm: bool = False  # RMS-normalize queries and keys per head
    tie_embeddings: bool = True  # the output layer shares the token embedding
    rope_base: float = 10000.0  # RoPE's base period (with pos_emb=rope)
    zero_init_proj: bool = False  # attention's and the MLP's output projections start at zero: each block starts as the identity
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap), in training and inference alike (0: off)
    # what a run may set apart from the checkpoint it resumes or finetunes: none changes what trained weights
    # compute (zero_init_proj is only how training started; a block size that needs other weights won't load)
    CHANGEABLE = ("dropout", "zero_init_proj", "block_size")

    def __post_init__(self):
        check_choices(self, {"pos_emb": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"),
                             "mlp": ("gelu", "gelu_tanh", "swiglu", "relu2")})
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rope needs an even head size (n_embd / n_head)")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap={self.logit_softcap} must be >= 0 (0: off)")


class Norm(nn.Module):
    def __init__(self, config, dim):
        super().__init__()
        self.kind = config.norm
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if config.bias and self.kind == "layernorm" else None

    def forward(self, x):
        if self.kind == "rmsnorm":
            return F.rms_norm(x, self.weight.shape, self.weight)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def rotate(x, cos, sin):
    """Rotary embedding: rotate pairs (first half, second half) of each head by position angles."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated for max_len,
    plus which key positions are real tokens (left padding is not). Under autocast the cache
    holds the autocast dtype (what attention computes in), not the weights' float32."""

    def __init__(self, config, batch_size, max_len, device, dtype=None):
        device = torch.device(device)
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else torch.float32
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    def update(self, layer, k, v):
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, rows, start=0):
        """Row i becomes row rows[i] (beam search keeps, drops and duplicates beams). Only the
        positions [start, length) are copied: not the preallocated tail, nor a prompt that the
        beams share (start = its length). Every row is copied, also one that stays: finding the
        ones that move would cost a host sync. A new number of rows gets new tensors of the same
        max_len, filled from position 0."""
        n = self.length
        if len(rows) != self.k.size(1):
            k, v, valid = self.k[:, rows, :, :n], self.v[:, rows, :, :n], self.valid[rows, :n]
            self.k = self.k.new_zeros(self.k.size(0), len(rows), *self.k.shape[2:])
            self.v = torch.zeros_like(self.k)
            self.valid = self.valid.new_zeros(len(rows), self.valid.size(1))
            self.k[:, :, :, :n], self.v[:, :, :, :n], self.valid[:, :n] = k, v, valid
            return
        self.k[:, :, :, start:n] = self.k[:, rows, :, start:n]
        self.v[:, :, :, start:n] = self.v[:, rows, :, start:n]
        self.valid[:, start:n] = self.valid[rows, start:n]

    def step(self, model, tokens, positions):
        """Logits (B, vocab) of one new token per row (tokens and positions (B, 1)), which joins
        the cache. generation.StaticKVCache runs the same step compiled."""
        return model(tokens, positions=positions, cache=self)[0][:, -1]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.qk_norm = config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, mask=None, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:  # bounds attention logits, which lets larger learning rates stay stable
            # (autocast runs rms_norm in fp32; FlexAttention wants q, k, v in one dtype)
            q, k = (F.rms_norm(t, (self.head_dim,)).type_as(v) for t in (q, k))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if isinstance(mask, BlockMask):  # packed documents, fused once compiled (no attention dropout)
            y = (compiled_flex_attention() if q.is_cuda else flex_attention)(q, k, v, block_mask=mask)
        else:  # mask None: plain causal training, which lets SDPA pick flash kernels
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        hidden = 4 * config.n_embd
        if self.kind == "swiglu":  # two input matrices: 2/3 the width keeps the parameter count
            hidden = 64 * math.ceil(hidden * 2 / 3 / 64)
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind in ("gelu", "gelu_tanh"):  # gelu_tanh: what OpenAI's GPT-2 weights were trained with
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        elif self.kind == "relu2":
            h = F.relu(h)
            h = h * h  # not .square(): CUDA's autocast runs pow in float32, a float32 copy of 4C per token
        else:
            h = F.silu(self.c_gate(x)) * h
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1, self.attn = Norm(config, config.n_embd), CausalSelfAttention(config)
        self.ln_2, self.mlp = Norm(config, config.n_embd), MLP(config)

    def forward(self, x, rope=None, mask=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    # packed documents: True attends through FlexAttention's block mask, False through the dense
    # mask (same result); None picks FlexAttention on CUDA. runtime.choose_attention sets it per card.
    use_flex_attention = None

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = Norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.pos_emb == "rope":
            head_dim = config.n_embd // config.n_head
            inv_freq = config.rope_base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init_weights)
        self.compiled_decoding = None  # generation.compile_decoding(model) sets it: generate's steps compiled

    def _init_weights(self, module):
        # GPT-2 init; residual projections scaled by 1/sqrt(2 * n_layer) so the residual
        # stream's variance does not grow with depth
        if isinstance(module, (nn.Linear, nn.Embedding)):
            residual = getattr(module, "residual", False)
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if residual and self.config.zero_init_proj:  # drawn first all the same: every other weight
                nn.init.zeros_(module.weight)  # starts as it would without zero_init_proj
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameters (shared ones once); non_embedding drops the position table, and the token
        table when it is tied (it is then the output layer, which does count as compute)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len=None, head_fraction=1.0):
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention scores
        (PaLM appendix B); the embedding lookups are free. With a loss index (finetuning) only
        head_fraction of the positions go through the output layer."""
        c, T = self.config, seq_len or self.config.block_size
        weights = self.num_params(non_embedding=True) - (0 if c.tie_embeddings else self.wte.weight.numel())
        return 6 * weights + 12 * c.n_layer * c.n_embd * T - (1 - head_fraction) * 6 * self.lm_head.weight.numel()

    def forward(self, idx, targets=None, loss_rows=None, loss_weights=None, positions=None, valid=None,
                cache=None, all_logits=False):
        """idx (B, T) token ids.
        Training: targets (B, T); returns (None, loss), the mean next-token loss, or with
        loss_rows (N,) flat positions into B*T and loss_weights (N,) the weighted sum of their
        losses (only those rows go through the 50k-wide head: finetuning saves most of it).
        positions (B, T) without valid: packed documents, each starting at position 0 and
        attending only to itself.
        Inference: positions (B, T) and valid (B, T) describe left-padded prompts, cache a
        KVCache; returns (last-step logits, or all of them, None)."""
        B, T = idx.shape
        packed = positions is not None and valid is None and cache is None
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:  # checked on sizes, not values: no device sync
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        x, rope = self.embed(idx, positions)
        mask = document_mask(positions, self.use_flex_attention) if packed else \
            self._attention_mask(valid, cache, start, T, idx.device)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)
        if targets is None:
            return self.output_logits(x if all_logits else x[:, -1:]), None
        if loss_rows is not None:  # an index, not a boolean mask: no host sync, a fixed shape
            logits = self.head(x.reshape(-1, x.size(-1)).index_select(0, loss_rows))
            losses = F.cross_entropy(logits.float(), targets.reshape(-1).index_select(0, loss_rows), reduction="none")
            return None, (losses * loss_weights).sum()
        logits = self.head(x)
        # the logits are not returned: at 32 x 1024 tokens they are gigabytes the caller would keep alive
        return None, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def head(self, x):
        """Training's logits: the output layer under autocast, soft-capped."""
        return self.softcap(self.lm_head(x))

    def output_logits(self, x):
        """Inference logits of the positions that are scored or sampled, in float32 even under
        autocast: a bf16 head rounds logits of ~20 by up to 0.06, enough to flip close label
        decisions and beam rankings. Only those positions pay for it (training keeps the fast head)."""
        with torch.autocast(x.device.type, enabled=False):
            return self.softcap(F.linear(x.float(), self.lm_head.weight.float()))

    def softcap(self, logits):
        """cap * tanh(logits / cap) when logit_softcap is set: in float32, where tanh near its
        saturation keeps the differences that bfloat16 would round away."""
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits.float() / cap) if cap else logits

    def embed(self, idx, positions):
        """Token embeddings (plus learned position embeddings), and RoPE's (cos, sin) or None."""
        x = self.wte(idx)
        if self.wpe is not None:
            return x + self.wpe(positions), None
        angles = positions[..., None].float() * self.inv_freq  # (B, T, head_dim / 2)
        return x, (angles.cos()[:, None], angles.sin()[:, None])

    @staticmethod
    def _attention_mask(valid, cache, start, T, device):
        """None for plain causal attention; else a (B, 1, T, keys) boolean mask that also hides
        left padding. A padded query still sees itself, so no softmax row is empty (no NaNs)."""
        if valid is None and cache is None:
            return None
        if valid is None:
            valid = torch.ones(cache.valid.size(0), T, dtype=torch.bool, device=device)
        if cache is not None:
            cache.valid[:, start:start + T] = valid
            valid = cache.valid[:, :start + T]
        query = torch.arange(start, start + T, device=device)[:, None]
        key = torch.arange(start + T, device=device)[None, :]
        mask = ((key <= query)[None] & valid[:, None, :]) | (key == query)[None]
        return mask[:, None]

    def check_room(self, prompt_len, new_tokens):
        if prompt_len + new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({prompt_len} tokens) + {new_tokens} new tokens exceeds "
                             f"block_size {self.config.block_size}")

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                 stop_tokens=(EOT,), use_cache=True, generator=None, on_token=None):
        """Continue each prompt (a list of token ids; lengths may differ) by up to max_new_tokens.
        temperature 0 is greedy. Returns the new tokens of each prompt, without the stop token.
        on_token(tokens), if given, is called after each step with that step's token of each row (a
        list; a stop token included, EOT for a row stopped before): for printing as they come.
        The prompts are left-padded into one batch; the KV cache means each step feeds only the
        newest token (one compiled call after generation.compile_decoding(model)). One host sync
        a step: whether every row has stopped."""
        device = self.wte.weight.device
        idx, valid, positions = left_pad(prompts, device)
        self.check_room(idx.size(1), max_new_tokens)
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        cache = KVCache(self.config, len(prompts), idx.size(1) + max_new_tokens, device) if use_cache else None
        logits = self(idx, positions=positions, valid=valid, cache=cache)[0][:, -1]
        if cache is not None and self.compiled_decoding is not None:
            cache = self.compiled_decoding.static_cache(self, cache)
        stop = torch.tensor(list(stop_tokens), device=device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        out, last_pos = [], positions[:, -1:]
        while True:
            token = sample_next(logits, temperature, top_k, top_p, generator)
            out.append(torch.where(done, torch.full_like(token, EOT), token))
            if on_token is not None:
                on_token(out[-1].tolist())
            done |= torch.isin(token, stop)  # a done row feeds its own token on: EOT is no id of a small vocab
            if len(out) == max_new_tokens or done.all():
                break
            token, next_pos = token[:, None], last_pos + len(out)
            if cache is not None:
                logits = cache.step(self, token, next_pos)
            else:  # the whole sequence again
                idx, positions = torch.cat((idx, token), 1), torch.cat((positions, next_pos), 1)
                valid = torch.cat((valid, torch.ones_like(token, dtype=torch.bool)), 1)
                logits = self(idx, positions=positions, valid=valid)[0][:, -1]
        results = []
        for row in torch.stack(out, 1).tolist():
            ends = [i for i, t in enumerate(row) if t in stop_tokens]
            results.append(row[:ends[0]] if ends else row)
        return results


@functools.cache
def compiled_flex_attention():
    return torch.compile(flex_attention)  # made on first use: loading the compiler takes seconds


def document_mask(positions, flex=None):
    """Causal attention within each packed document (a document starts where its position is 0).
    FlexAttention's block mask on CUDA keeps a fused kernel and skips blocks across documents;
    elsewhere a dense (B, 1, T, T) mask for SDPA (FlexAttention has no CPU backward)."""
    docs = (positions == 0).cumsum(1)
    B, T = docs.shape
    if docs.is_cuda if flex is None else flex:
        def same_document(b, h, q, k):
            return (k <= q) & (docs[b, q] == docs[b, k])
        return create_block_mask(same_document, B, None, T, T, device=docs.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
    return (causal & (docs[:, :, None] == docs[:, None, :]))[:, None]


def left_pad(prompts, device):
    """A left-padded batch as GPT.forward takes it: (idx, valid, positions), each (B, P)."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("need at least one prompt, and every prompt needs at least one token")
    B, P = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(B, P, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    for row, p in enumerate(prompts):
        idx[row, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        valid[row, P - len(p):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return idx.to(device), valid.to(device), positions.to(device)


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from (B, vocab) logits; never a padding id beyond GPT-2's vocab."""
    logits = logits.float()
    logits[:, GPT2_VOCAB:] = -float("inf")
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, -float("inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
