"""Tests for metrics.py: hand-worked SQuAD cases, agreement with rouge-score / sacrebleu on
real CNN/DailyMail rows, the sentence splitter, baselines and guard rails."""
import gzip
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CNN_VAL = DATA / "cnn_dailymail" / "validation.jsonl.gz"


# ---------------------------------------------------------------- SQuAD EM / F1

def test_normalize_answer():
    assert metrics.normalize_answer("  The  Denver Broncos!  ") == "denver broncos"
    # Articles only as whole words: "theater" and "another" keep their letters.
    assert metrics.normalize_answer("An apple, a theater; another") == "apple theater another"
    # Punctuation is removed before articles, so "the-end" becomes the single word "theend".
    assert metrics.normalize_answer("the-end") == "theend"


def test_punctuation_and_case_ignored():
    assert metrics.squad_exact_match("Denver Broncos!", ["denver broncos"]) == 1.0
    assert metrics.squad_f1("Denver Broncos!", ["denver broncos"]) == 1.0


def test_articles_ignored():
    assert metrics.squad_exact_match("the Broncos", ["Broncos"]) == 1.0
    assert metrics.squad_f1("the Broncos", ["Broncos"]) == 1.0


def test_max_over_gold_answers():
    golds = ["Carolina Panthers", "Denver Broncos", "Broncos"]
    assert metrics.squad_exact_match("Broncos", golds) == 1.0
    # vs "Denver Broncos": P = 1/1, R = 1/2 -> F1 = 2/3; vs "Broncos": 1.0 -> max is 1.0
    assert metrics.squad_f1("Broncos", golds) == 1.0
    assert metrics.squad_f1("Broncos", golds[:2]) == pytest.approx(2 / 3)
    # A bare string is treated as one gold answer, not as a list of characters.
    assert metrics.squad_exact_match("Broncos", "Broncos") == 1.0


def test_empty_prediction_scores_zero():
    assert metrics.squad_exact_match("", ["Denver Broncos"]) == 0.0
    assert metrics.squad_f1("", ["Denver Broncos"]) == 0.0
    # v1.1 rule: no common token -> F1 0, even if both normalize to nothing.
    assert metrics.squad_f1("the", ["a"]) == 0.0


def test_partial_overlap_f1_by_hand():
    # pred "the big red dog" -> normalized tokens [big, red, dog]   (article removed)
    # gold "red dog house"   -> normalized tokens [red, dog, house]
    # common = {red, dog} = 2; precision = 2/3, recall = 2/3
    # F1 = 2 * (2/3) * (2/3) / (2/3 + 2/3) = 2/3
    assert metrics.squad_f1("the big red dog", ["red dog house"]) == pytest.approx(2 / 3)
    # Token bags count repeats: pred [dog, dog] vs gold [dog]: common 1, P = 1/2, R = 1 -> 2/3
    assert metrics.squad_f1("dog dog", ["dog"]) == pytest.approx(2 / 3)
    assert metrics.squad_exact_match("the big red dog", ["red dog house"]) == 0.0


def test_squad_scores_averages_times_100():
    preds = ["Denver Broncos", "the big red dog", ""]
    refs = [["Denver Broncos", "Broncos"], ["red dog house"], ["Santa Clara"]]
    out = metrics.squad_scores(preds, refs)
    assert out["count"] == 3
    assert out["exact_match"] == pytest.approx(100 * (1 + 0 + 0) / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    # ROUGE is the max over golds per example, then the mean; here rouge1 matches F1 by hand
    # except that rouge-score keeps "the": [the, big, red, dog] vs [red, dog, house] -> 4/7.
    assert out["rouge1"] == pytest.approx(100 * (1 + 4 / 7 + 0) / 3)
    scorer = rouge_scorer.RougeScorer(["rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge2", "rougeL"):
        expected = sum(max(scorer.score(g, p)[key].fmeasure for g in gs)
                       for p, gs in zip(preds, refs))
        assert out[key] == pytest.approx(100 * expected / 3)


# ---------------------------------------------------------------- summarization on real rows

@pytest.fixture(scope="module")
def cnn_rows():
    if not CNN_VAL.exists():
        pytest.skip(f"real data not found at {CNN_VAL}")
    with gzip.open(CNN_VAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, 5)]


def test_summarization_matches_reference_libraries(cnn_rows):
    preds = [metrics.lead3(r["article"]) for r in cnn_rows]
    refs = [r["highlights"] for r in cnn_rows]
    out = metrics.summarization_scores(preds, refs)
    assert out["count"] == 5

    keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(keys, use_stemmer=True)
    # lead3 output is already one sentence per line, so the direct call sees the same text.
    direct = [scorer.score(ref, pred) for ref, pred in zip(refs, preds)]
    for key in keys:
        assert out[key] == pytest.approx(100 * sum(d[key].fmeasure for d in direct) / 5)

    bleu = sacrebleu.corpus_bleu(preds, [refs])
    assert out["bleu"] == pytest.approx(bleu.score)
    assert out["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")

    # Lead-3 is a strong baseline: published CNN numbers are ~29 ROUGE-1.
    assert 20 < out["rouge1"] < 60
    assert 0 < out["rouge2"] < out["rouge1"]


def test_rougelsum_uses_sentence_split_of_prediction(cnn_rows):
    # A one-line prediction must score like its newline-split version (the splitter is applied).
    ref = cnn_rows[0]["highlights"]
    pred_lines = metrics.lead3(cnn_rows[0]["article"])
    flat = pred_lines.replace("\n", " ")
    a = metrics.summarization_scores([flat], [ref])
    b = metrics.summarization_scores([pred_lines], [ref])
    assert a["rougeLsum"] == pytest.approx(b["rougeLsum"])
    assert a["bleu"] == pytest.approx(b["bleu"])


def test_lead3_takes_three_sentences():
    article = "One is here. Two is there! Three? Four is not included."
    assert metrics.lead3(article) == "One is here.\nTwo is there!\nThree?"
    assert metrics.lead3("Only one sentence") == "Only one sentence"


# ---------------------------------------------------------------- sentence splitter

def test_split_sentences_basic():
    assert metrics.split_sentences("Hello world. How are you? Fine!") == \
        ["Hello world.", "How are you?", "Fine!"]


def test_split_sentences_documented_behaviour():
    # Newlines always separate sentences; blank lines vanish.
    assert metrics.split_sentences("First line\n\nSecond line. Third.") == \
        ["First line", "Second line.", "Third."]
    # Titles and single initials do not end a sentence.
    assert metrics.split_sentences("Mr. Smith met Dr. Jones. George W. Bush left.") == \
        ["Mr. Smith met Dr. Jones.", "George W. Bush left."]
    # Closing quotes stay with their sentence; a lowercase continuation is not a boundary.
    assert metrics.split_sentences('He said "Go." Then 3 left. e.g. this stays') == \
        ['He said "Go."', "Then 3 left. e.g. this stays"]
    # Known imperfection: an acronym before a capitalized word is split.
    assert metrics.split_sentences("The U.S. Army won.") == ["The U.S.", "Army won."]
    assert metrics.split_sentences("") == []


# ---------------------------------------------------------------- baselines, accuracy, guards

def test_question_overlap_sentence():
    context = ("The game was played in Santa Clara. Denver beat Carolina to win the Super Bowl. "
               "The halftime show featured Coldplay.")
    assert metrics.question_overlap_sentence(context, "Who headlined the halftime show?") == \
        "The halftime show featured Coldplay."
    assert metrics.question_overlap_sentence(context, "Which team won the Super Bowl?") == \
        "Denver beat Carolina to win the Super Bowl."
    # No content-word overlap anywhere: tie at 0 -> earliest sentence.
    assert metrics.question_overlap_sentence(context, "What is it?") == \
        "The game was played in Santa Clara."


def test_majority_label_and_accuracy():
    assert metrics.majority_label([1, 0, 1, 1, 0]) == 1
    assert metrics.majority_label(["neg", "pos"]) == "neg"  # tie: first seen
    out = metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0])
    assert out == {"accuracy": 50.0, "count": 4}


def test_guard_rails():
    with pytest.raises(ValueError, match="empty"):
        metrics.squad_scores([], [])
    with pytest.raises(ValueError, match="empty"):
        metrics.summarization_scores([], [])
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy([], [])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        metrics.squad_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="1 predictions but 2"):
        metrics.summarization_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="2 predictions but 3"):
        metrics.accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="no gold answers"):
        metrics.squad_f1("a", [])
    with pytest.raises(ValueError):
        metrics.majority_label([])


# ---------------------------------------------------------------- uncertainty

PREDS = ["the cat sat on the mat today", "a dog barked loudly at night", "rain fell", "hello there my friend"]
REFS = ["the cat sat on a mat", "the dog barked at night", "it rained all day", "hello friend"]


def test_bleu_of_any_subset_from_summed_statistics_is_sacrebleus_corpus_bleu():
    stats = metrics.bleu_statistics(PREDS, REFS)
    for subset in ([0, 1, 2, 3], [0, 0, 3], [1, 2], [2, 2, 2, 1]):
        expected = sacrebleu.metrics.BLEU().corpus_score([PREDS[i] for i in subset], [[REFS[i] for i in subset]])
        assert metrics.bleu_from_statistics(stats[subset].sum(0)) == pytest.approx(expected.score)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_examples():
    rng = np.random.default_rng(1)
    small, large = rng.random(20), rng.random(2000)
    lo, hi = metrics.bootstrap_interval(lambda idx: small[idx].mean(), len(small))
    assert lo < small.mean() < hi
    lo2, hi2 = metrics.bootstrap_interval(lambda idx: large[idx].mean(), len(large))
    assert hi2 - lo2 < (hi - lo) / 5  # ~ 1/sqrt(n): 10x the width for 100x fewer examples
    assert metrics.bootstrap_interval(lambda idx: np.ones(5)[idx].mean(), 5) == (1.0, 1.0)


def test_confidence_intervals_cover_each_reported_score():
    cis = metrics.confidence_intervals("summarization", PREDS, [[r] for r in REFS], resamples=200)
    scores = metrics.summarization_scores(PREDS, REFS)
    assert set(cis) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"}
    assert all(cis[k][0] <= scores[k] <= cis[k][1] for k in cis)
    squad = metrics.confidence_intervals("extractive_qa", ["Denver Broncos", "x"], [["Denver Broncos"], ["y"]], resamples=200)
    assert squad["exact_match"][0] == 0.0 and squad["exact_match"][1] == 100.0
    sst2 = metrics.confidence_intervals("classification", ["positive"] * 4, [["positive"]] * 4)
    assert sst2 == {"accuracy": (100.0, 100.0)}


def test_cluster_bootstrap_is_wider_than_iid_on_clustered_scores():
    """40 articles of 25 questions; an article is easy or hard for the model (its own success rate),
    so its questions' scores move together and the i.i.d. bootstrap understates the uncertainty."""
    rng = np.random.default_rng(0)
    rates = rng.uniform(0.1, 0.9, size=40)
    clusters = np.repeat([f"article {a}" for a in range(40)], 25)
    scores = (rng.random(1000) < np.repeat(rates, 25)).astype(float)
    def mean(idx):
        return scores[idx].mean()

    lo, hi = metrics.bootstrap_interval(mean, 1000)
    clo, chi = metrics.bootstrap_interval(mean, 1000, clusters=list(clusters))
    assert clo < scores.mean() < chi
    assert chi - clo > 2 * (hi - lo)  # ~ sqrt(1 + 24 * intra-cluster correlation) wider
    # scores that do not depend on the article: the two agree
    flat = (rng.random(1000) < 0.5).astype(float)
    width = [np.subtract(*metrics.bootstrap_interval(lambda idx: flat[idx].mean(), 1000, clusters=c))
             for c in (None, list(clusters))]
    assert width[1] == pytest.approx(width[0], rel=0.35)
    # through confidence_intervals, as report.py calls it: each SQuAD question right or wrong by its article
    preds = ["Denver Broncos" if s else "x" for s in scores]
    cis = metrics.confidence_intervals("extractive_qa", preds, [["Denver Broncos"]] * 1000, resamples=200,
                                       clusters=list(clusters))
    assert cis["exact_match"][1] - cis["exact_match"][0] > 2 * 100 * (hi - lo)
