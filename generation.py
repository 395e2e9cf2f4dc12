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
        cache.reorder(torch.tensor(rows, device=device))
        logits, _ = model(torch.tensor([[t] for _, _, t in live], device=device), cache=cache)
        logits = logits[:, -1]
    return max(finished, key=lambda h: h[0])[1] if finished else []


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
    for step in range(max_new_tokens):
        allowed = torch.zeros(B, min(logits.size(-1), GPT2_VOCAB), dtype=torch.bool)
        for row in range(B):
            if done[row]:
                allowed[row, EOT] = True
                continue
            nxt = starts[row] + step
            allowed[row, np.unique(contexts[row][nxt[nxt < len(contexts[row])]])] = True
            allowed[row, EOT] = step > 0
        scores = logits[:, -1, :allowed.size(1)].float().masked_fill(~allowed.to(device), -float("inf"))
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
        logits, _ = model(choice[:, None], positions=positions[:, -1:] + step + 1, cache=cache)
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
            branch = copy.copy(cache)
            branch.reorder(torch.arange(B, device=device))  # fresh tensors: the prompt cache stays intact
            feed = torch.tensor(label[:-1], device=device).expand(B, -1)
            pos = positions[:, -1:] + 1 + torch.arange(len(label) - 1, device=device)
            rest, _ = model(feed, positions=pos, cache=branch, all_logits=True)
            target = torch.tensor(label[1:], device=device).expand(B, -1)
            out[:, j] += token_logprobs(rest).gather(-1, target[..., None]).squeeze(-1).sum(1)
    return out.float().cpu()
