"""--limit draws a seeded, proportionally stratified sample (subsets.py): the same every time, in the
split's order, covering SQuAD's articles and CNN/DM's two sources, never the first N rows."""
import math
from collections import Counter

import pytest

import subsets
import tasks


@pytest.fixture(scope="module")
def squad_rows(shared_data):
    return tasks.get_task("squad").load_rows("validation", str(shared_data))


def test_sample_is_seeded_ordered_and_proportional_to_its_strata():
    keys = ["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5
    chosen = subsets.stratified_indices(keys, 20, seed=0)
    assert chosen == subsets.stratified_indices(keys, 20, seed=0)  # the same sample every time
    assert chosen != subsets.stratified_indices(keys, 20, seed=1)
    assert chosen == sorted(set(chosen)) and len(chosen) == 20  # in the rows' order, no repeats
    assert Counter(keys[i] for i in chosen) == {"a": 10, "b": 6, "c": 3, "d": 1}  # exactly 20% of each
    # 7 of 100: exact shares 3.5, 2.1, 1.05, 0.35; floors 3+2+1 = 6, the largest remainder (a) gets the 7th
    assert Counter(keys[i] for i in subsets.stratified_indices(keys, 7)) == {"a": 4, "b": 2, "c": 1}
    assert subsets.stratified_indices(keys, 500) == list(range(100))  # more than there are: all of them
    unstratified = subsets.stratified_indices([None] * 100, 10)
    assert len(unstratified) == 10 and unstratified != list(range(10))


def test_fewer_rows_than_strata_go_to_seeded_strata():
    keys = [k for k in range(10) for _ in range(4)]  # ten strata of four rows: ties everywhere
    picks = {tuple(keys[i] for i in subsets.stratified_indices(keys, 3, seed)) for seed in range(10)}
    assert all(len(set(p)) == 3 for p in picks)  # one row each from three strata
    assert len(picks) > 1  # which three is the seed's choice, not always the first ones


def test_squad_sample_of_500_covers_every_article_in_proportion(squad_rows):
    task = tasks.get_task("squad")
    assert len({r["title"] for r in squad_rows[:500]}) == 1  # the first 500 questions: one article
    sample, record = task.subset(squad_rows, 500)
    assert sample == task.subset(squad_rows, 500)[0]
    articles = Counter(r["title"] for r in squad_rows)
    drawn = Counter(r["title"] for r in sample)
    assert len(drawn) == len(articles) == record["strata"] == record["strata_sampled"] > 30
    for title, count in articles.items():  # each article's share, rounded down or up
        exact = 500 * count / len(squad_rows)
        assert math.floor(exact) <= drawn[title] <= math.ceil(exact)
    position = {r["id"]: i for i, r in enumerate(squad_rows)}
    assert [position[r["id"]] for r in sample] == sorted(position[r["id"]] for r in sample)
    assert record == {"rows": 500, "of": len(squad_rows), "method": "seeded random sample, proportionally stratified",
                      "seed": 0, "stratified_by": "article (title)", "strata": len(articles),
                      "strata_sampled": len(articles), "ids_blake2b": subsets.ids_digest(r["id"] for r in sample)}
    other = task.subset(squad_rows, 500, seed=1)[1]
    assert other["seed"] == 1 and other["ids_blake2b"] != record["ids_blake2b"]
    whole = task.subset(squad_rows)[1]
    assert whole["method"] == "whole split" and whole["rows"] == len(squad_rows) and whole["seed"] is None


def test_cnn_dailymail_sample_holds_both_sources_in_proportion(shared_data):
    task = tasks.get_task("cnn_dailymail")
    rows = task.load_rows("test", str(shared_data))
    sources = [task.stratum(r) for r in rows]
    cnn = sources.count("cnn")  # the HF test split holds its CNN stories first, then Daily Mail's
    assert cnn >= 1060 and sources[:1065].count("cnn") == cnn
    sample, record = task.subset(rows, 500)
    drawn = Counter(task.stratum(r) for r in sample)
    assert drawn["cnn"] in (math.floor(500 * cnn / len(rows)), math.ceil(500 * cnn / len(rows)))
    assert drawn["dailymail"] == 500 - drawn["cnn"] and record["strata"] == 2


def test_news_source_reads_the_url_else_the_articles_credit():
    assert tasks.news_source("https://www.cnn.com/2015/04/01/x.html", "text") == "cnn"
    assert tasks.news_source("http://www.dailymail.co.uk/news/article-1.html", "(CNN) text") == "dailymail"
    assert tasks.news_source(None, "Marseille, France (CNN)The French prosecutor ...") == "cnn"
    assert tasks.news_source(None, "(The Hollywood Reporter) Richard Dysart ...") == "cnn"
    assert tasks.news_source(None, "Consumers could soon have to pay goods and services tax (GST) ...") == "dailymail"


def test_ids_digest_names_the_set_of_ids_whatever_their_order():
    assert subsets.ids_digest(["b", "a", "c"]) == subsets.ids_digest(["a", "b", "c"])
    assert subsets.ids_digest(["a", "b"]) != subsets.ids_digest(["a", "c"])
    assert len(subsets.ids_digest([1, 2])) == 32  # 128 bits, hex
