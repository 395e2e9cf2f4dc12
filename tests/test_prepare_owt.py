"""prepare_owt.py and decontaminate.py: round trip, determinism, caps, errors, atomic output,
13-gram decontamination. Real documents come from ../shared/data/webtext (skipped if absent)."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEBTEXT = SHARED / "data" / "webtext" / "train-00000.jsonl.gz"
sys.path.insert(0, str(ROOT))
if (SHARED / "tiktoken").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))

import decontaminate  # noqa: E402
import prepare_owt  # noqa: E402
from common import EOT, UserError, get_tokenizer  # noqa: E402

N_DOCS = 200


@pytest.fixture(scope="module")
def docs():
    if not WEBTEXT.exists():
        pytest.skip(f"{WEBTEXT} not found")
    out = []
    with gzip.open(WEBTEXT, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) == N_DOCS:
                break
    return out


@pytest.fixture(scope="module")
def corpus(docs, tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "docs.jsonl.gz"
    write_jsonl(path, docs)
    return path


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer()


def write_jsonl(path, texts):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def prepare(src, out, *extra):
    """Run prepare_owt in-process; later flags in `extra` override these defaults."""
    return prepare_owt.main(["--source", str(src), "--out-dir", str(out), "--num-proc", "1",
                             "--val-fraction", "0.1", *extra])


def split_docs(path, enc):
    """The documents of one .bin file: decode the tokens between EOTs."""
    tokens = np.fromfile(path, dtype=np.uint16)
    if tokens.size:
        assert tokens[-1] == EOT, "every document, the last included, ends with EOT"
    ends = np.flatnonzero(tokens == EOT)
    starts = np.concatenate(([0], ends[:-1] + 1))
    return [enc.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


def assert_ordered_partition(expected, train, val):
    """train and val are each in source order and together hold every document exactly once."""
    it = iv = 0
    for doc in expected:
        if it < len(train) and train[it] == doc:
            it += 1
        else:
            assert iv < len(val) and val[iv] == doc, "a document is missing or out of order"
            iv += 1
    assert (it, iv) == (len(train), len(val)), "extra documents in the output"


# ---- round trip, determinism, caps ----------------------------------------------------------

def test_round_trip_and_meta(corpus, docs, enc, tmp_path):
    meta = prepare(corpus, tmp_path)
    out = tmp_path / "owt"
    train, val = split_docs(out / "train.bin", enc), split_docs(out / "val.bin", enc)
    assert train and val
    assert_ordered_partition(docs, train, val)
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    for name, texts in (("train", train), ("val", val)):
        assert meta["splits"][name]["documents"] == len(texts)
        assert meta["splits"][name]["tokens"] == os.path.getsize(out / f"{name}.bin") // 2
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == N_DOCS
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot"], meta["dtype"]) == ("gpt2", 50257, EOT, "uint16")
    assert meta["args"]["val_fraction"] == 0.1 and meta["stopped_by"] is None
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]  # no temp files left


def test_num_proc_gives_identical_bytes(corpus, tmp_path):
    prepare(corpus, tmp_path / "a", "--num-proc", "1")
    prepare(corpus, tmp_path / "b", "--num-proc", "2")
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "a/owt" / name).read_bytes() == (tmp_path / "b/owt" / name).read_bytes()


def test_seed_changes_split(corpus, tmp_path):
    a = prepare(corpus, tmp_path / "a", "--seed", "0")
    b = prepare(corpus, tmp_path / "b", "--seed", "1")
    assert (tmp_path / "a/owt/val.bin").read_bytes() != (tmp_path / "b/owt/val.bin").read_bytes()
    assert a["splits"]["train"]["documents"] + a["splits"]["val"]["documents"] == \
        b["splits"]["train"]["documents"] + b["splits"]["val"]["documents"]


def test_max_tokens_keeps_longest_prefix_of_whole_documents(corpus, docs, enc, tmp_path):
    cap = 50_000
    sizes = np.cumsum([len(enc.encode_ordinary(d)) + 1 for d in docs])  # +1: EOT counts
    k = int(np.searchsorted(sizes, cap, side="right"))  # documents whose running total <= cap
    assert 0 < k < N_DOCS
    meta = prepare(corpus, tmp_path, "--max-tokens", str(cap), "--num-proc", "2")  # pool stopped early
    out = tmp_path / "owt"
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert total == sizes[k - 1] <= cap < sizes[k]
    assert meta["stopped_by"] == "max_tokens"
    assert_ordered_partition(docs[:k], split_docs(out / "train.bin", enc), split_docs(out / "val.bin", enc))


def test_max_bytes_keeps_longest_prefix_of_source_text(corpus, docs, tmp_path):
    cap = 100_000
    sizes = np.cumsum([len(d.encode()) for d in docs])
    k = int(np.searchsorted(sizes, cap, side="right"))
    meta = prepare(corpus, tmp_path, "--max-bytes", str(cap))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == k
    assert meta["source_bytes"] == sizes[k - 1] and meta["stopped_by"] == "max_bytes"


def test_txt_and_parquet_sources(tmp_path, enc):
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = tmp_path / "src"
    src.mkdir()
    (src / "b.txt").write_text("Second file, one document.\n\nStill the same document.")
    (src / "a.txt").write_text("First file (sorted by name).")
    (src / "notes.md").write_text("ignored: not a supported extension")
    prepare(src, tmp_path / "t", "--val-fraction", "0")
    assert split_docs(tmp_path / "t/owt/train.bin", enc) == [
        "First file (sorted by name).", "Second file, one document.\n\nStill the same document."]
    texts = [f"parquet document {i} ✓" for i in range(5)]
    pq.write_table(pa.table({"id": list(range(5)), "text": texts}), tmp_path / "d.parquet", row_group_size=2)
    prepare(tmp_path / "d.parquet", tmp_path / "p", "--val-fraction", "0")
    assert split_docs(tmp_path / "p/owt/train.bin", enc) == texts


# ---- errors ---------------------------------------------------------------------------------

BAD_INPUTS = {  # file name -> (bytes, expected message part)
    "empty.jsonl": (b"\n", "holds no documents"),
    "bad.jsonl": (b'{"text": "fine"}\n{"text": "unterminated\n', "bad.jsonl line 2: malformed JSON"),
    "notext.jsonl": (b'{"text": "fine"}\n\n{"body": "no text field"}\n', 'notext.jsonl line 3 has no "text"'),
    "latin1.jsonl.gz": (gzip.compress(b'{"text": "caf\xe9"}\n'), "latin1.jsonl.gz line 1 is not UTF-8"),
    "latin1.txt": (b"caf\xe9 au lait", "latin1.txt is not UTF-8"),
    "empty.txt": (b"", "holds no documents"),  # not a train.bin of one EOT
    "blank.txt": (b" \n\n", "holds no documents"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_error(name, tmp_path):
    data, expected = BAD_INPUTS[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError) as e:
        prepare(tmp_path / name, tmp_path / "out", "--num-proc", "2")
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out/owt/train.bin").exists()


@pytest.mark.parametrize("source, expected", [
    ("missing", "does not exist"),
    ("*.jsonl", "matches no files"),
    ("notes.csv", "is not a .jsonl/.jsonl.gz/.parquet/.txt file"),
    (".", "holds no .jsonl/.jsonl.gz/.parquet/.txt files"),
])
def test_bad_source_path(source, expected, tmp_path):
    (tmp_path / "notes.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match=expected.replace(".", r"\.")):
        prepare(tmp_path / source, tmp_path / "out")


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="--val-fraction must be in"):
        prepare(tmp_path, tmp_path, "--val-fraction", "1.5")
    with pytest.raises(UserError, match="--max-tokens must be at least 1"):
        prepare(tmp_path, tmp_path, "--max-tokens", "0")


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    for source, expected in ((tmp_path / "missing", "does not exist"), (tmp_path / "bad.jsonl", "line 2")):
        r = subprocess.run([sys.executable, "prepare_owt.py", "--source", str(source), "--out-dir", str(tmp_path),
                            "--num-proc", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr
        assert lines[-1].startswith("error: ") and expected in lines[-1] and "Traceback" not in r.stderr
        assert r.stderr.count("error:") == 1
    # a path error comes before any work: it is all the user sees (a mid-stream one follows the bar)
    first = subprocess.run([sys.executable, "prepare_owt.py", "--source", str(tmp_path / "missing")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert first.stderr.strip().splitlines() == [first.stderr.strip()] and first.stdout == ""


# ---- atomic output --------------------------------------------------------------------------

class FailingEncoder:
    """Tokenizes a few documents, then fails like a crash halfway through a run."""

    def __init__(self, real, fail_after):
        self.real, self.calls, self.fail_after = real, 0, fail_after

    def encode_ordinary(self, text):
        self.calls += 1
        if self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return self.real.encode_ordinary(text)


def test_interrupted_run_leaves_no_output(corpus, enc, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_owt, "get_tokenizer", lambda: FailingEncoder(enc, fail_after=70))  # > 1 chunk
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(corpus, tmp_path)
    assert os.listdir(tmp_path / "owt") == []  # no train.bin, val.bin, meta.json nor temp files


def test_run_with_workers_failing_mid_stream_leaves_no_output(docs, tmp_path):
    source = tmp_path / "src.jsonl"
    write_jsonl(source, docs)
    with open(source, "a") as f:
        f.write("{not json\n")  # read after the workers have tokenized many chunks
    with pytest.raises(UserError, match="malformed JSON"):
        prepare(source, tmp_path / "out", "--num-proc", "2")
    assert os.listdir(tmp_path / "out" / "owt") == []


def test_interrupted_rerun_keeps_previous_output(corpus, enc, tmp_path, monkeypatch):
    prepare(corpus, tmp_path, "--max-tokens", "20000")
    before = {p.name: p.read_bytes() for p in (tmp_path / "owt").iterdir()}
    monkeypatch.setattr(prepare_owt, "get_tokenizer", lambda: FailingEncoder(enc, fail_after=70))
    with pytest.raises(RuntimeError):
        prepare(corpus, tmp_path)
    assert {p.name: p.read_bytes() for p in (tmp_path / "owt").iterdir()} == before


# ---- decontamination ------------------------------------------------------------------------

EVAL_TEXT = ("The committee met on Tuesday to review the harbour project, and after six hours of debate "
             "it voted to delay construction until an independent survey of the seabed is complete next spring.")
# 13 consecutive words of EVAL_TEXT with other case and punctuation:
PLANTED = ("Local news. AFTER six hours of debate -- it voted to delay Construction, until an independent "
           "survey... Readers were not surprised.")
TWELVE = "after six hours of debate it voted to delay construction until an"  # one word short
UNRELATED = ["A recipe for bread needs flour, water, salt and yeast, and a lot of patience while it rises.",
             "The football season opened with a surprising win for the visiting team in heavy rain.",
             TWELVE + " unrelated ending here.",
             "Stock markets closed slightly higher on Friday after a quiet week of trading."]


def test_normalization_and_hashes():
    assert decontaminate.normalize_words("The U.S. isn't  WELL-known!\n") == ["the", "us", "isnt", "wellknown"]
    words = EVAL_TEXT.split()
    h = decontaminate.ngram_hashes(EVAL_TEXT)
    assert h.dtype == np.uint64 and h.size == len(words) - 12
    assert np.array_equal(h, decontaminate.ngram_hashes(EVAL_TEXT.upper().replace(",", " ; ")))
    assert decontaminate.ngram_hashes(TWELVE).size == 0  # shorter than n words: no n-grams
    # stable across processes and runs (Python's hash() is salted per process)
    fox = "The quick brown fox jumps over the lazy dog while seven wizards quietly hex jolly numbers."
    assert decontaminate.ngram_hashes(fox)[:2].tolist() == [5012287789288672853, 15190737364243635578]


def test_ngram_index():
    index = decontaminate.NgramIndex([EVAL_TEXT, EVAL_TEXT, "short"])
    assert len(index) == len(EVAL_TEXT.split()) - 12  # duplicates add nothing
    assert index.hashes.dtype == np.uint64 and np.all(index.hashes[1:] > index.hashes[:-1])
    assert index.contains_any(PLANTED)
    assert not any(index.contains_any(t) for t in UNRELATED + [TWELVE, ""])  # 12 words of it: no 13-gram
    assert not decontaminate.NgramIndex([]).contains_any(PLANTED)
    assert (index.short_texts, index.too_short) == (0, 1)  # "short" is under MIN_WORDS: counted only


SHORT_REVIEW = "a gorgeous , witty , seductive movie ."  # an SST-2 sentence of 5 words


def test_short_texts_are_matched_whole():
    """Evaluation texts too short for a 13-gram (most SST-2 sentences) are matched as a run of whole
    words; texts under MIN_WORDS words are too common to match and only counted."""
    index = decontaminate.NgramIndex([SHORT_REVIEW, TWELVE, "a great film ."])
    assert len(index) == 0 and index.short_texts == 2 and index.too_short == 1
    assert index.contains_any("Critics agreed: A gorgeous, witty, seductive movie! Go see it.")
    assert index.contains_any(UNRELATED[2])  # TWELVE, then other words
    assert not index.contains_any("a gorgeous, witty, seductive film")  # one word differs
    assert not index.contains_any("gorgeous witty seductive movie")  # four of its five words
    assert not index.contains_any("It was a great film.")  # under MIN_WORDS: never matched
    assert not index.contains_any("a gorgeous witty seductive moviegoer")  # whole words only
    # the whole-text hash is the hash of the same run inside a longer text
    words = decontaminate.normalize_words(SHORT_REVIEW)
    assert decontaminate.text_hash(words) == decontaminate.ngram_hashes("x " + SHORT_REVIEW + " y", n=5)[1]


def test_prepare_decontaminate(tmp_path, enc, monkeypatch, capsys):
    calls = []

    def fake_index(data_root=None):
        calls.append(data_root)
        return decontaminate.NgramIndex([EVAL_TEXT])
    monkeypatch.setattr(decontaminate, "load_eval_index", fake_index)
    texts = [UNRELATED[0], PLANTED, UNRELATED[1], UNRELATED[2], "Intro. " + EVAL_TEXT.lower(), UNRELATED[3]]
    write_jsonl(tmp_path / "src.jsonl", texts)
    meta = prepare(tmp_path / "src.jsonl", tmp_path, "--decontaminate", "--data-root", str(tmp_path),
                   "--num-proc", "2", "--val-fraction", "0")
    assert calls == [str(tmp_path)]
    assert split_docs(tmp_path / "owt/train.bin", enc) == UNRELATED
    d = meta["decontamination"]
    assert d["enabled"] and d["documents_dropped"] == 2 and d["eval_ngrams"] == len(EVAL_TEXT.split()) - 12
    assert (d["min_words"], d["short_texts_matched_whole"], d["texts_too_short"]) == (5, 0, 0)
    assert "dropped 2 documents" in capsys.readouterr().out


def test_load_eval_index_uses_tasks(monkeypatch):
    """The real tasks.py on one small evaluation split (SST-2 validation, 872 sentences)."""
    tasks = pytest.importorskip("tasks")
    data_root = SHARED / "data"
    if not (data_root / "glue_sst2").is_dir():
        pytest.skip("../shared/data/glue_sst2 not found")
    monkeypatch.setattr(tasks, "TASKS", {"sst2": tasks.TASKS["sst2"]})
    index = decontaminate.load_eval_index(data_root=str(data_root))
    sst2 = tasks.get_task("sst2")
    sentences = [t for row in sst2.load_rows("validation", data_root=str(data_root)) for t in sst2.inputs(row)]
    n_grams = {h for t in sentences for h in decontaminate.ngram_hashes(t).tolist()}
    assert len(index) == len(n_grams) > 0
    long = next(t for t in sentences if len(decontaminate.normalize_words(t)) >= 13)
    assert index.contains_any("Before. " + long.upper() + " After.")
    lengths = [len(decontaminate.normalize_words(t)) for t in sentences]
    assert index.too_short == sum(n < 5 for n in lengths) > 0
    assert index.short_texts == len({" ".join(decontaminate.normalize_words(t)) for t in sentences
                                     if 5 <= len(decontaminate.normalize_words(t)) < 13}) > 200
    short = next(t for t in sentences if 5 <= len(decontaminate.normalize_words(t)) < 13)
    assert index.contains_any("A review said " + short + " and more.")  # a short SST-2 sentence is dropped
