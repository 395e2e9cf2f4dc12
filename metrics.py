"""Evaluation metrics and baselines for the finetuning tasks (pure functions: no model, no torch).

Scores must match what papers report, so each one follows the reference implementation:
- SQuAD v1.1: exact match / F1 exactly as the official evaluate-v1.1.py computes them.
- CNN/DailyMail: ROUGE from Google's `rouge-score` (use_stemmer=True, rougeLsum over
  newline-separated sentences) and corpus BLEU from `sacrebleu` with its default settings.
- SST-2: plain accuracy.
All averaged scores are reported on a 0-100 scale, together with the example count.
"""
import re
import string
from collections import Counter

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

_PUNCTUATION = set(string.punctuation)  # ASCII only, exactly like the official SQuAD script


def _check_lengths(predictions, references, what="references"):
    # An empty list would silently average to 0 or divide by zero; a length mismatch almost
    # always means predictions were paired with the wrong examples. Both are user mistakes.
    if len(predictions) == 0:
        raise ValueError("no predictions to score: the prediction list is empty")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} {what}; "
                         "they must be paired one to one")


# ---------------------------------------------------------------- SQuAD v1.1

def normalize_answer(s):
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace.
    Same steps in the same order as the official v1.1 script (order matters: punctuation goes
    before articles, so "the-end" -> "theend" keeps its "the")."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _as_list(gold_answers):
    # A bare string would otherwise be iterated character by character.
    golds = [gold_answers] if isinstance(gold_answers, str) else list(gold_answers)
    if not golds:
        raise ValueError("an example has no gold answers")
    return golds


def _f1_single(prediction, gold):
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:  # v1.1 rule: no shared token -> 0, even when both sides are empty
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction, gold_answers):
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(max(pred == normalize_answer(g) for g in _as_list(gold_answers)))


def squad_f1(prediction, gold_answers):
    """Token-bag F1 against each gold answer; the best one counts (as in the official script)."""
    return max(_f1_single(prediction, g) for g in _as_list(gold_answers))


def squad_example_scores(predictions, references_list):
    """Per-example EM, F1 and ROUGE-1/2/L (0-1; ROUGE and F1 take the best gold answer)."""
    _check_lengths(predictions, references_list, "reference lists")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out = {key: [] for key in ("exact_match", "f1", "rouge1", "rouge2", "rougeL")}
    for pred, golds in zip(predictions, references_list):
        golds = _as_list(golds)
        out["exact_match"].append(squad_exact_match(pred, golds))
        out["f1"].append(squad_f1(pred, golds))
        per_gold = [scorer.score(g, pred) for g in golds]  # score(target, prediction)
        for key in ("rouge1", "rouge2", "rougeL"):
            out[key].append(max(s[key].fmeasure for s in per_gold))
    return out


def squad_scores(predictions, references_list):
    """predictions: list of strings; references_list: list of lists of gold answer strings."""
    out = mean_scores(squad_example_scores(predictions, references_list))
    out["count"] = len(predictions)
    return out


def mean_scores(per_example):
    """Each per-example score list as its mean on a 0-100 scale."""
    return {key: 100.0 * sum(values) / len(values) for key, values in per_example.items()}


# ---------------------------------------------------------------- summarization

# Words that end in "." without ending a sentence. Deliberately short: a missed abbreviation
# only moves one sentence boundary, which barely changes rougeLsum.
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "gen", "gov", "sen",
                  "rep", "lt", "col", "sgt", "capt", "rev", "mt", "ft", "vs"}
# A boundary: ., ! or ? (plus any closing quotes/brackets), whitespace, then something that
# can start a sentence (capital letter, digit, or an opening quote/bracket).
_BOUNDARY = re.compile(r"([.!?][\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")


def split_sentences(text):
    """Split text into sentences with a regex (no nltk download needed).
    Existing newlines always separate sentences. Within a line we split after . ! ? followed
    by whitespace and a capital/digit/opening quote, except after a short list of titles
    ("Mr.", "Dr.", ...) and single-letter initials ("J. K. Rowling"). Acronyms such as
    "U.S." followed by a capitalized word are still split: a known, accepted imperfection."""
    sentences = []
    for line in text.split("\n"):
        pieces = _BOUNDARY.sub("\\1\n", line.strip()).split("\n")
        merged = []
        for piece in pieces:
            last_word = merged[-1].split()[-1].rstrip(".") if merged else ""
            is_initial = len(last_word) == 1 and last_word.isupper() and last_word != "I"
            if merged and (last_word.lower() in _ABBREVIATIONS or is_initial):
                merged[-1] += " " + piece
            else:
                merged.append(piece)
        sentences.extend(p.strip() for p in merged if p.strip())
    return sentences


def summarization_example_scores(predictions, references):
    """Per-example ROUGE-1/2/L/Lsum F-measures (0-1). references must already have one sentence
    per line (CNN/DM highlights do); predictions are split with split_sentences so that
    rougeLsum sees sentences on both sides."""
    _check_lengths(predictions, references)
    keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    out = {key: [] for key in keys}
    for pred, ref in zip(predictions, references):
        # Newlines only matter to rougeLsum; the tokenizer treats them as spaces otherwise.
        scores = scorer.score(ref, "\n".join(split_sentences(pred)))
        for key in keys:
            out[key].append(scores[key].fmeasure)
    return out


def summarization_scores(predictions, references):
    """ROUGE-1/2/L/Lsum (mean per-example F-measure x100) and corpus BLEU for summaries."""
    out = mean_scores(summarization_example_scores(predictions, references))
    # sacrebleu's default 13a tokenizer turns the newlines inside highlights into spaces.
    bleu = sacrebleu.metrics.BLEU()
    out["bleu"] = bleu.corpus_score(list(predictions), [list(references)]).score
    out["bleu_signature"] = str(bleu.get_signature())
    out["count"] = len(predictions)
    return out


def bleu_statistics(predictions, references):
    """Per-example BLEU sufficient statistics (rows: hypothesis length, reference length, 4
    n-gram matches, 4 n-gram totals); corpus BLEU of any subset is bleu_from_statistics of the
    sum of its rows, exactly as sacrebleu's corpus_score adds them up."""
    bleu = sacrebleu.metrics.BLEU(effective_order=True)  # changes sentence scores only, not their statistics
    rows = []
    for pred, ref in zip(predictions, references):
        s = bleu.sentence_score(pred, [ref])
        rows.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    return np.array(rows, dtype=np.int64)


def bleu_from_statistics(total):
    return sacrebleu.metrics.BLEU.compute_bleu(correct=list(total[2:6]), total=list(total[6:10]), sys_len=int(total[0]),
                                               ref_len=int(total[1]), smooth_method="exp").score


# ---------------------------------------------------------------- classification

def accuracy(predictions, labels):
    """Percentage of predictions equal to their label."""
    _check_lengths(predictions, labels, "labels")
    correct = sum(p == y for p, y in zip(predictions, labels))
    return {"accuracy": 100.0 * correct / len(labels), "count": len(labels)}


# ---------------------------------------------------------------- uncertainty

def bootstrap_interval(statistic, n, resamples=1000, level=0.95, seed=0, clusters=None):
    """Percentile bootstrap: `statistic` of `resamples` index arrays drawn with replacement from
    range(n); returns the (low, high) quantiles around `level`. clusters (one label per item):
    draw whole clusters with replacement instead (as many as there are), each bringing all its
    items, for items that are not independent (the questions of one SQuAD article)."""
    rng = np.random.default_rng(seed)
    if clusters is not None:
        labels, which = np.unique([str(c) for c in clusters], return_inverse=True)
        members = [np.flatnonzero(which == c) for c in range(len(labels))]
    values = []
    for _ in range(resamples):
        if clusters is None:
            idx = rng.integers(0, n, size=n)
        else:
            idx = np.concatenate([members[c] for c in rng.integers(0, len(members), size=len(members))])
        values.append(statistic(idx))
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def confidence_intervals(kind, predictions, references_list, resamples=1000, clusters=None):
    """95% bootstrap intervals (0-100 scale) of the scores of a task of this kind (extractive_qa,
    summarization or classification), from its predictions: each per-example score resampled
    (by clusters, if given: see bootstrap_interval); BLEU, a corpus score, recomputed on each."""
    if kind == "extractive_qa":
        per_example = squad_example_scores(predictions, references_list)
    elif kind == "summarization":
        refs = [r[0] for r in references_list]
        per_example = summarization_example_scores(predictions, refs)
    else:
        per_example = {"accuracy": [float(p == r[0]) for p, r in zip(predictions, references_list)]}
    n = len(predictions)
    out = {}
    for key, values in per_example.items():
        values = 100.0 * np.asarray(values)
        out[key] = bootstrap_interval(lambda idx: values[idx].mean(), n, resamples, clusters=clusters)
    if kind == "summarization":
        stats = bleu_statistics(predictions, refs)
        out["bleu"] = bootstrap_interval(lambda idx: bleu_from_statistics(stats[idx].sum(0)), n, resamples,
                                         clusters=clusters)
    return out


# ---------------------------------------------------------------- baselines

def first_sentences(text, n):
    """The first n sentences of text (split_sentences), one per line."""
    return "\n".join(split_sentences(text)[:n])


def lead3(article):
    """The classic CNN/DM baseline: the article's first three sentences, one per line."""
    return first_sentences(article, 3)


# Question words and function words that carry no answer-locating signal.
# (a/an/the are not listed: normalize_answer already removed them.)
_STOPWORDS = set("""
what which who whom whose when where why how is are was were be been being am do does did
of in on at to for from by with about as into than then that this these those there their
they them it its he she his her him we our you your i me my and or but not no if so
has have had can could would should will shall may might must many much most some any
""".split())


def question_overlap_sentence(context, question):
    """Baseline QA answer: the context sentence sharing the most distinct non-stopword
    normalized tokens with the question. Ties go to the earliest sentence."""
    def content_words(text):
        return {w for w in normalize_answer(text).split() if w not in _STOPWORDS}

    question_words = content_words(question)
    best, best_overlap = "", -1
    for sentence in split_sentences(context):
        overlap = len(content_words(sentence) & question_words)
        if overlap > best_overlap:  # strict '>' keeps the earliest sentence on ties
            best, best_overlap = sentence, overlap
    return best


def majority_label(train_labels):
    """Most frequent training label (ties: the label seen first); the majority-class baseline."""
    if len(train_labels) == 0:
        raise ValueError("no training labels: cannot pick a majority label")
    return Counter(train_labels).most_common(1)[0][0]
