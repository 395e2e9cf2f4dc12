"""Decoding beyond GPT.generate: beam search, span-constrained extractive decoding and label
scoring. All of them keep the prefix in a KVCache and feed only new tokens.

- beam_search: one prompt, HF-style. A hypothesis of L new tokens (a final stop token counts)
  scores sum(log p) / L ** length_penalty. The search stops once num_beams hypotheses are
  finished and the best live beam, normalized at its current length, is no better than the
  worst of them (HF's early_stopping=False), so num_beams=1 is exactly greedy decoding.
  no_repeat_ngram_size blocks n-grams repeated within the *generated* tokens only (HF also
  blocks n-grams of a decoder-only prompt); for summaries that is deliberate: copying a phrase
  of the article is what a good summary does, repeating itself is not.
- constrained_span_decode: greedy, but each step allows only tokens that keep the output a
  contiguous token span of the context (any start), and EOT once one token is out.
- label_logprobs: sum of log p(label tokens | prompt) for each candidate label.
Only GPT-2's 50257 real tokens are ever predicted (the embedding's padding rows are not).

compile_decoding(model) makes GPT.generate, batched_beam_search and constrained_span_decode run
each step after the prompt's as one compiled call over a StaticKVCache (the prompt itself stays
eager): the same shapes every step, so it compiles once or twice in all, not once a step.
"""
import copy

import numpy as np
import torch
from torch.nn import functional as F

from common import EOT
from model import GPT2_VOCAB, KVCache, left_pad


def token_logprobs(logits):
    """Log-probabilities over the real GPT-2 vocabulary (float32)."""
    return F.log_softmax(logits[..., :GPT2_VOCAB].float(), dim=-1)


def decode_text(enc, tokens):
    """Token ids -> stripped text. Bytes of a character cut at the edge of a span are dropped (not
    turned into U+FFFD), so a token span of a text always decodes to a substring of that text."""
    return enc.decode(list(tokens), errors="ignore").strip()


def _new_cache(model, batch_size, max_len):
    return KVCache(model.config, batch_size, max_len, model.wte.weight.device)


class StaticKVCache(KVCache):
    """A KVCache whose one-token steps all have the same shapes and addresses, as torch.compile
    (no recompiling) and CUDA graphs (replaying) need: every row holds block_size positions, a
    step writes at `slot`, a device tensor, and attends to all positions, masking those that
    hold no token (`valid`). It takes over a prefilled KVCache (load); `length` is `slot` on the
    host, for reorder."""

    def __init__(self, config, rows, device, dtype, compiled, cuda_graphs):
        super().__init__(config, rows, config.block_size, device, dtype)
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        self.layer = torch.arange(config.n_layer, device=device)  # a tensor index writes in place
        self.compiled, self.cuda_graphs = compiled, cuda_graphs
        if cuda_graphs:  # replays read these at the addresses they were recorded with
            for buffer in (self.k, self.v, self.valid, self.slot, self.layer):
                torch._dynamo.mark_static_address(buffer)

    def load(self, cache, rows=None):
        """Hold what `cache` holds (row rows[i] of it as row i, if given), ready for step."""
        rows = slice(None) if rows is None else rows
        n = self.length = cache.length
        self.k[:, :, :, :n] = cache.k[:, rows, :, :n]
        self.v[:, :, :, :n] = cache.v[:, rows, :, :n]
        self.valid.zero_()
        self.valid[:, :n] = cache.valid[rows, :n]
        self.slot.fill_(n)
        return self

    def update(self, layer, k, v):
        # an index_put into the whole buffer: written through a view (k[layer]), inductor would
        # copy the whole layer every step
        where = (self.layer[layer:layer + 1], slice(None), slice(None), self.slot.view(1))
        self.k[where], self.v[where] = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)  # (1, B, n_head, head_dim)
        return self.k[layer], self.v[layer]

    def step(self, model, tokens, positions):
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.compiled(model, self, tokens, positions)
        self.slot += 1
        self.length += 1
        return logits.clone() if self.cuda_graphs else logits  # the next replay overwrites its output


def _static_step(model, cache, tokens, positions):
    """GPT.forward's cached step for one token per row over a StaticKVCache (what is compiled)."""
    x, rope = model.embed(tokens, positions)
    cache.valid[:, cache.slot.view(1)] = True
    mask = cache.valid[:, None, None, :]  # the new token sees every position that holds a token
    x = model.drop(x)
    for layer, block in enumerate(model.blocks):
        x = block(x, rope, mask, cache, layer)
    return model.output_logits(model.ln_f(x))[:, -1]


class CompiledDecoding:
    """What compile_decoding attaches to a model: the compiled step and the StaticKVCache of the last
    number of rows and dtype decoded, kept while batches keep that shape so that its addresses stay
    fixed (a CUDA graph replays them). Only one is kept: evaluate.py fitting its batch to memory tries
    several sizes, and caches kept for each would hold the memory the batch is fitted into."""

    def __init__(self, cuda_graphs=False):
        self.cuda_graphs = cuda_graphs
        self.step = torch.compile(_static_step, fullgraph=True, mode="reduce-overhead" if cuda_graphs else None)
        self.caches = {}

    def static_cache(self, model, cache, rows=None):
        """A StaticKVCache holding what the prefilled `cache` holds (row rows[i] of it as row i)."""
        n_rows = cache.k.size(1) if rows is None else len(rows)
        key = (n_rows, cache.k.dtype, cache.k.device)
        if key not in self.caches:
            self.caches.clear()
            self.caches[key] = StaticKVCache(model.config, n_rows, cache.k.device, cache.k.dtype, self.step,
                                             self.cuda_graphs)
        return self.caches[key].load(cache, rows)


def compile_decoding(model, cuda_graphs=False):
    """Decode with compiled steps from now on: GPT.generate, batched_beam_search and
    constrained_span_decode run the prompt eagerly as before, then each new token is one call of a
    compiled function over a StaticKVCache. It compiles for the first number of rows, and once more
    for all others (dynamic shapes); each takes seconds to a minute. Beam search then keeps a
    finished prompt's rows instead of dropping them: fewer rows would be another shape, so another
    CUDA graph to record. cuda_graphs: also record the step as a CUDA graph (torch.compile's
    mode="reduce-overhead"), which replays it with one launch instead of hundreds. The tokens are
    eager decoding's up to float rounding (a near-tie can flip). Returns model;
    model.compiled_decoding = None turns it off."""
    getattr(model, "_orig_mod", model).compiled_decoding = CompiledDecoding(cuda_graphs)
    return model


def release_decoding_cache(model):
    """Free the static cache compiled decoding keeps (the next batch allocates its own)."""
    if getattr(model, "compiled_decoding", None) is not None:
        model.compiled_decoding.caches.clear()


def _decoding_cache(model, cache, rows=None):
    """The cache that one-token steps continue from a prefilled `cache` (row rows[i] of it as row i)."""
    if model.compiled_decoding is not None:
        return model.compiled_decoding.static_cache(model, cache, rows)
    if rows is not None:
        cache.reorder(rows)
    return cache


def _banned_ngram_tokens(tokens, n):
    """Tokens that would complete an n-gram already present in `tokens`."""
    if n <= 0 or len(tokens) < n - 1:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1:])
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix]


@torch.no_grad()
def beam_search(model, prompt_ids, num_beams, max_new_tokens, length_penalty=1.0,
                no_repeat_ngram_size=0, stop_tokens=(EOT,)):
    """Best continuation of one prompt (a list of ids) by beam search: its new tokens, without
    the stop token. The prompt goes through the model once; the beams share its cache rows."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("the prompt needs at least one token")
    model.check_room(len(prompt), max_new_tokens)
    if max_new_tokens <= 0:
        return []
    device, stop = model.wte.weight.device, set(stop_tokens)
    cache = _new_cache(model, 1, len(prompt) + max_new_tokens)
    logits, _ = model(torch.tensor([prompt], device=device), cache=cache)
    logits = logits[:, -1]
    beams, scores = [[]], [0.0]  # one live beam to start: the prompt itself
    finished = []  # (normalized score, tokens)
    for step in range(max_new_tokens):
        length = step + 1
        logp = token_logprobs(logits)
        for row, tokens in enumerate(beams):
            banned = _banned_ngram_tokens(tokens, no_repeat_ngram_size)
            if banned:
                logp[row, banned] = -float("inf")
        total = torch.tensor(scores, device=device)[:, None] + logp
        k = min(total.numel(), num_beams * (1 + len(stop)))  # enough to leave num_beams live ones
        top_scores, top_ids = total.view(-1).topk(k)
        live = []  # (score, beam row, token), best first
        for rank, (score, flat) in enumerate(zip(top_scores.tolist(), top_ids.tolist())):
            if score == -float("inf") or len(live) == num_beams:
                break
            row, token = divmod(flat, logp.size(1))
            if token in stop:
                if rank < num_beams:  # as in HF: a stop token counts only among the top num_beams
                    finished.append((score / length ** length_penalty, beams[row]))
            else:
                live.append((score, row, token))
        if not live or step == max_new_tokens - 1:
            finished += [(s / length ** length_penalty, beams[r] + [t]) for s, r, t in live]
            break
        if len(finished) >= num_beams:
            finished = sorted(finished, key=lambda h: h[0], reverse=True)[:num_beams]
            if finished[-1][0] >= live[0][0] / length ** length_penalty:
                break
        rows = [r for _, r, _ in live]
        beams = [beams[r] + [t] for _, r, t in live]
        scores = [s for s, _, _ in live]
        cache.reorder(torch.tensor(rows, device=device), start=len(prompt))
        logits, _ = model(torch.tensor([[t] for _, _, t in live], device=device), cache=cache)
        logits = logits[:, -1]
    return max(finished, key=lambda h: h[0])[1] if finished else []


def _ban_repeated_ngrams(logp, generated, n):
    """_banned_ngram_tokens for every row at once: generated (rows, L) on the device."""
    if n <= 0 or generated.size(1) < n:
        return logp
    windows = generated.unfold(1, n, 1)  # (rows, L - n + 1, n)
    repeats = (windows[..., :-1] == generated[:, None, generated.size(1) - n + 1:]).all(-1)
    # min with +inf leaves a token as it is: a token that also ends a window that does not
    # repeat is still banned (a plain scatter would let either window win)
    bans = torch.where(repeats, -float("inf"), float("inf"))  # not torch.tensor(inf): a host copy syncs
    return logp.scatter_reduce_(1, windows[..., -1], bans, reduce="amin")


class _Finished:
    """The best num_beams finished hypotheses of each prompt: normalized score (float64, as the
    Python floats of beam_search), tokens and length; a score of -inf marks an empty slot."""

    def __init__(self, n_prompts, num_beams, max_len, device):
        self.score = torch.full((n_prompts, num_beams), -float("inf"), dtype=torch.float64, device=device)
        self.tokens = torch.zeros(n_prompts, num_beams, max_len, dtype=torch.long, device=device)
        self.length = torch.zeros(n_prompts, num_beams, dtype=torch.long, device=device)

    def add(self, prompts, score, tokens, length):
        """Candidates of the given prompts: score (n, c), -inf for none; tokens (n, c, max_len)."""
        score = torch.cat((self.score[prompts], score), 1)
        best = score.topk(self.score.size(1), dim=1).indices
        self.score[prompts] = score.gather(1, best)
        length = torch.cat((self.length[prompts], torch.full_like(best, length)), 1)
        self.length[prompts] = length.gather(1, best)
        tokens = torch.cat((self.tokens[prompts], tokens), 1)
        self.tokens[prompts] = tokens.gather(1, best[..., None].expand(-1, -1, tokens.size(2)))

    def best(self):
        """Each prompt's best hypothesis as a list of ids ([] if it has none)."""
        top = self.score.argmax(1)
        rows = torch.arange(len(top), device=top.device)
        found = (self.score[rows, top] > -float("inf")).tolist()
        tokens, length = self.tokens[rows, top].tolist(), self.length[rows, top].tolist()
        return [t[:n] if ok else [] for t, n, ok in zip(tokens, length, found)]


def _next_beams(total, num_beams, stop):
    """One step of beam_search's selection for every prompt at once. total (N, num_beams * V):
    beam score + log p of each (beam, token). Returns the top candidates' (score, flat index),
    which of them end a hypothesis (a stop token among the top num_beams), and the order that
    puts the first num_beams live (non-stop) candidates in front, best first, with `keep` False
    where a prompt has fewer."""
    k = min(total.size(1), num_beams * (1 + len(stop)))  # enough to leave num_beams live ones
    top, flat = total.topk(k, dim=1)
    finite, is_stop = top > -float("inf"), torch.isin(flat % (total.size(1) // num_beams), stop)
    live = finite & ~is_stop
    live &= live.cumsum(1) <= num_beams
    ends = (finite & is_stop)[:, :num_beams]
    order = torch.sort((~live).to(torch.uint8), dim=1, stable=True).indices[:, :num_beams]
    return top, flat, ends, order, live.gather(1, order)


@torch.no_grad()
def batched_beam_search(model, prompts, num_beams, max_new_tokens, length_penalty=1.0,
                        no_repeat_ngram_size=0, stop_tokens=(EOT,)):
    """beam_search of many prompts at once, with the same result for each. The prompts go
    through the model once, left-padded; then each has num_beams rows (prompt-major) and every
    step is one forward of all rows. Beams, finished hypotheses and n-gram blocking stay on the
    device; a prompt whose search is over leaves the batch (with compile_decoding its rows stay,
    ignored: the step's shapes never change). One host sync a step: which prompts are still on."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    device, nb = model.wte.weight.device, num_beams
    idx, valid, positions = left_pad(prompts, device)
    N, P = idx.shape
    model.check_room(P, max_new_tokens)
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    cache = _new_cache(model, N, P + max_new_tokens)
    logits, _ = model(idx, positions=positions, valid=valid, cache=cache)
    cache = _decoding_cache(model, cache, torch.arange(N, device=device).repeat_interleave(nb))
    keep_rows = model.compiled_decoding is not None
    logits, last_pos = logits[:, -1].repeat_interleave(nb, 0), positions[:, -1:].repeat_interleave(nb, 0)
    scores = torch.full((N, nb), -float("inf"), device=device)
    scores[:, 0] = 0.0  # one live beam to start: the prompt itself
    generated = torch.zeros(N * nb, max_new_tokens, dtype=torch.long, device=device)
    finished, active = _Finished(N, nb, max_new_tokens, device), torch.arange(N, device=device)
    over = torch.zeros(N, dtype=torch.bool, device=device)  # a search that is over adds nothing more
    beam = torch.arange(nb, device=device)
    for step in range(max_new_tokens):
        n, norm = len(active), (step + 1) ** length_penalty
        logp = _ban_repeated_ngrams(token_logprobs(logits), generated[:, :step], no_repeat_ngram_size)
        top, flat, ends, order, keep = _next_beams((scores.view(-1, 1) + logp).view(n, -1), nb, stop)
        rows = torch.arange(n, device=device)[:, None] * nb + flat // logp.size(1)
        finished.add(active, torch.where(ends & ~over[:, None], top[:, :nb].double() / norm, -float("inf")),
                     generated[rows[:, :nb]], step)
        scores = torch.where(keep, top.gather(1, order), -float("inf"))
        rows, tokens = rows.gather(1, order).view(-1), (flat % logp.size(1)).gather(1, order).view(-1)
        generated = generated[rows]
        generated[:, step] = tokens
        if step == max_new_tokens - 1:  # the live beams end here
            live = torch.where(keep & ~over[:, None], scores.double() / norm, -float("inf"))
            finished.add(active, live, generated.view(n, nb, -1), step + 1)
            break
        worst = finished.score[active, -1]  # num_beams finished and no live beam beats them
        over |= ~keep[:, 0] | ((worst > -float("inf")) & (worst >= scores[:, 0].double() / norm))
        if keep_rows:
            if over.all():
                break
        else:
            running = (~over).nonzero().squeeze(1)
            if len(running) == 0:
                break
            if len(running) < n:
                kept = (running[:, None] * nb + beam).view(-1)
                active, scores, over = active[running], scores[running], over[running]
                rows, tokens, generated, last_pos = rows[kept], tokens[kept], generated[kept], last_pos[kept]
        cache.reorder(rows, start=P)  # a prompt's beams share its keys: only generated ones move
        logits = cache.step(model, tokens.view(-1, 1), last_pos + step + 1)
    return finished.best()


@torch.no_grad()
def constrained_span_decode(model, prompts, contexts_ids, max_new_tokens):
    """Greedy extractive decoding for a batch: the output of row i is always a contiguous span of
    contexts_ids[i] (pass the context's ids as they appear in the prompt, leading space included,
    which is also how the answer target starts). EOT ends a row once it has one token; a span
    that reaches the context's end can only stop. Returns each row's tokens, without EOT."""
    if len(prompts) != len(contexts_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(contexts_ids)} contexts")
    contexts = [np.asarray(c, dtype=np.int64) for c in contexts_ids]
    if any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least one token")
    device = model.wte.weight.device
    idx, valid, positions = left_pad(prompts, device)
    B, P = idx.shape
    model.check_room(P, max_new_tokens)
    cache = _new_cache(model, B, P + max_new_tokens)
    starts = [np.arange(len(c)) for c in contexts]  # span starts that agree with the output so far
    out, done = [[] for _ in range(B)], [max_new_tokens <= 0] * B
    logits, _ = model(idx, positions=positions, valid=valid, cache=cache)
    logits, cache = logits[:, -1], _decoding_cache(model, cache)
    for step in range(max_new_tokens):
        allowed = torch.zeros(B, min(logits.size(-1), GPT2_VOCAB), dtype=torch.bool)
        for row in range(B):
            if done[row]:
                allowed[row, EOT] = True
                continue
            nxt = starts[row] + step
            allowed[row, np.unique(contexts[row][nxt[nxt < len(contexts[row])]])] = True
            allowed[row, EOT] = step > 0
        scores = logits[:, :allowed.size(1)].float().masked_fill(~allowed.to(device), -float("inf"))
        choice = scores.argmax(-1)
        for row, token in enumerate(choice.tolist()):
            if done[row]:
                continue
            if token == EOT:
                done[row] = True
                continue
            out[row].append(token)
            ctx, nxt = contexts[row], starts[row] + step
            starts[row] = starts[row][(nxt < len(ctx)) & (ctx[np.minimum(nxt, len(ctx) - 1)] == token)]
        if all(done):
            break
        logits = cache.step(model, choice[:, None], positions[:, -1:] + step + 1)
    return out


@torch.no_grad()
def label_logprobs(model, prompts, label_token_lists):
    """(N, num_labels) float32: sum over each label's tokens of log p(token | prompt, earlier
    label tokens). The left-padded prompts go through the model once; a label of several tokens
    continues from a copy of their cache."""
    labels = [list(label) for label in label_token_lists]
    if not labels or min(len(label) for label in labels) == 0:
        raise ValueError("need at least one label, and every label needs at least one token")
    device = model.wte.weight.device
    idx, valid, positions = left_pad(prompts, device)
    B, P = idx.shape
    longest = max(len(label) for label in labels)
    model.check_room(P, longest - 1)
    cache = _new_cache(model, B, P + longest - 1)
    logits, _ = model(idx, positions=positions, valid=valid, cache=cache)
    first = token_logprobs(logits[:, -1])
    out = torch.zeros(B, len(labels), device=device)
    for j, label in enumerate(labels):
        out[:, j] = first[:, label[0]]
        if len(label) > 1:
            branch = copy.copy(cache)  # shares the prompt's keys and writes only after them
            feed = torch.tensor(label[:-1], device=device).expand(B, -1)
            pos = positions[:, -1:] + 1 + torch.arange(len(label) - 1, device=device)
            rest, _ = model(feed, positions=pos, cache=branch, all_logits=True)
            target = torch.tensor(label[1:], device=device).expand(B, -1)
            out[:, j] += token_logprobs(rest).gather(-1, target[..., None]).squeeze(-1).sum(1)
    return out.float().cpu()
