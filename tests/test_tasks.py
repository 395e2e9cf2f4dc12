"""tasks.py and prepare_finetune.py on a few real rows from ../shared/data (skipped without it)."""
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
DATA = SHARED / "data"
if (SHARED / "tiktoken").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
sys.path.insert(0, str(ROOT))

import prepare_finetune  # noqa: E402
import tasks  # noqa: E402
from common import EOT, UserError, get_tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
LIMIT = 24

# The prompt formats, written out by hand: a change in tasks.py must show up here.
HEADS = {"cnn_dailymail": "Summarize the following news article.\n\nArticle: ",
         "squad": "Answer the question with a short span copied from the passage.\n\nPassage: ",
         "sst2": "Is the sentiment of this sentence positive or negative?\n\nSentence: "}
SEPS = {"cnn_dailymail": "\n\nSummary:", "squad": "\n\nAnswer:", "sst2": "\n\nSentiment:"}


def hand_built(task, row, text=None):
    """instruction + input (+ question) + separator, and target + EOT, as strings built by hand."""
    if task == "cnn_dailymail":
        inp, question, target = row["article"].strip(), "", row["highlights"].strip()
    elif task == "squad":
        inp, question = row["context"].strip(), "\n\nQuestion: " + row["question"].strip()
        target = row["answers"]["text"][0].strip()
    else:
        inp, question, target = row["sentence"].strip(), "", ["negative", "positive"][int(row["label"])]
    return HEADS[task] + (inp if text is None else text) + question + SEPS[task], " " + target + "<|endoftext|>"


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer()


def run_prepare(out, *extra):
    prepare_finetune.main(["--data-root", str(DATA), "--out-dir", str(out), "--limit", str(LIMIT),
                           "--splits", "train,validation", *extra])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    run_prepare(out, "--num-proc", "1")
    return out


def prepared_rows(task, split):
    """The rows a prepared split holds, in order: train's less the select slice held out of it."""
    if split == "validation":
        return task.load_rows(split, DATA, limit=LIMIT)
    args = prepare_finetune.parse_args(["--data-root", str(DATA), "--limit", str(LIMIT)])
    train, select, _ = prepare_finetune.hold_out(task, task.load_rows("train", DATA, limit=LIMIT),
                                                 *prepare_finetune.reported_keys(task, args))
    return train if split == "train" else select


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_prepared_examples_are_prompt_plus_target(prepared, enc, task):
    meta = json.loads((prepared / task / "meta.json").read_text())
    assert meta["tasks_version"] == tasks.TASKS_VERSION and meta["block_size"] == 1024
    assert meta["splits"]["train"]["examples"] + meta["splits"]["select"]["examples"] == LIMIT
    for split in ("train", "select", "validation"):
        rows = prepared_rows(tasks.get_task(task), split)
        assert meta["splits"][split]["examples"] == len(rows) > 0
        data = tasks.FinetuneSplit(str(prepared / task / split))
        assert len(data) == len(rows)
        n_uncut = 0
        for i, row in enumerate(rows):
            tokens, plen = data.example(i)
            assert len(tokens) <= 1024 and tokens[-1] == EOT
            # the prompt in the .bin is what evaluate.py rebuilds with Task.prompt
            ids, cut, _ = tasks.get_task(task).prompt(row, enc, 1024)
            assert tokens[:plen].tolist() == ids
            # the loss region is exactly the target + EOT
            assert tokens[plen:].tolist() == enc.encode_ordinary(" " + tasks.get_task(task).training_target(row)) + [EOT]
            prompt, target = hand_built(task, row)
            assert enc.decode(tokens[plen:].tolist()) == target
            if cut == 0:
                n_uncut += 1
                assert enc.decode(tokens.tolist()) == prompt + target
                assert tasks.get_task(task).prompt_text(row) == prompt
            else:  # a cut article: the kept text is a prefix of the article, the rest intact
                head = HEADS[task]
                text = enc.decode(tokens[:plen].tolist())[len(head):-len(SEPS[task])]
                assert row["article"].strip().startswith(text) and len(text) > 1000
                assert enc.decode(tokens.tolist()) == hand_built(task, row, text)[0] + target
        assert n_uncut > 0


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_a_row_of_ones_own_texts_is_prompted_as_the_data_row(task, enc):
    """sample.py --task builds its row with row_of: the inputs, and so the prompt, are the data row's."""
    t = tasks.get_task(task)
    for row in t.load_rows("validation", str(DATA), limit=5):
        own = t.row_of(t.inputs(row))
        assert t.inputs(own) == t.inputs(row)
        assert t.prompt(own, enc, 256) == t.prompt(row, enc, 256)


def test_labels_and_references(enc):
    sst2, squad = tasks.get_task("sst2"), tasks.get_task("squad")
    row = {"sentence": " a gem . ", "label": "1", "idx": 7}
    assert sst2.training_target(row) == "positive" and sst2.references(row) == ["positive"]
    assert sst2.label_words[1] == tasks.TARGET_PREFIX + "positive"
    assert sst2.target_ids(row, enc) == ([enc.encode_ordinary(" positive")[0], EOT], False)
    assert sst2.example_id(row) == "7" and sst2.inputs(row) == ["a gem ."]
    words = [enc.encode_ordinary(w) for w in sst2.label_words]
    assert all(len(w) == 1 for w in words) and words[0] != words[1]
    assert sst2.label({"label": 0}) == 0
    for bad in (-1, "-1", 2, None, "x"):
        with pytest.raises(UserError, match="expected 0 or 1"):
            sst2.label({"label": bad, "idx": 0})
    row = squad.load_rows("validation", DATA, limit=1)[0]
    assert squad.references(row) == [t.strip() for t in row["answers"]["text"]]
    assert squad.inputs(row) == [row["context"].strip(), row["question"].strip()]
    assert tasks.get_task("cnn_dailymail").max_target_tokens == 128
    assert [t.name for t in tasks.task_list("all")] == list(tasks.TASKS) == ["cnn_dailymail", "squad", "sst2"]


def test_long_article_is_cut_at_a_sentence_end(enc):
    head = enc.encode_ordinary(HEADS["cnn_dailymail"].rstrip(" "))
    sep = enc.encode_ordinary(SEPS["cnn_dailymail"])
    room = 300 - 128 - len(head) - len(sep)  # input tokens that fit in block 300
    shorter = 0
    cnn = tasks.get_task("cnn_dailymail")
    for row in cnn.load_rows("validation", DATA, limit=5):
        ids, cut, span = cnn.prompt(row, enc, 300)
        assert cut > 0 and len(ids) + 128 <= 300
        assert ids[:len(head)] == head and ids[-len(sep):] == sep
        kept = ids[len(head):-len(sep)]
        full = enc.encode_ordinary(" " + row["article"].strip())
        assert kept == full[:len(full) - cut]  # a prefix of the article's own tokens
        text = enc.decode(kept)
        assert text.rstrip("\"')").endswith((".", "!", "?"))  # a sentence end ...
        assert len(kept) >= room // 2  # ... keeping at least half the room
        shorter += len(kept) < room
        assert ids[slice(*span)] == kept  # the input span names exactly the kept article tokens
        ex = cnn.encode_example(row, enc, 300)
        assert len(ex["prompt"]) + len(ex["target"]) <= 300 and ex["input_cut"] == cut
    assert shorter >= 3  # a token-boundary cut would fill the room exactly


def test_cut_falls_back_to_a_token_boundary(enc):
    row = {"id": "x", "article": "word " * 3000, "highlights": "short"}
    ids, cut, _ = tasks.get_task("cnn_dailymail").prompt(row, enc, 256)
    assert len(ids) + 128 == 256 and cut == 3000 - (len(ids) - len(enc.encode_ordinary(HEADS["cnn_dailymail"]
                                                                                       .rstrip(" ") + SEPS["cnn_dailymail"])))


def test_squad_question_is_never_cut(enc):
    squad = tasks.get_task("squad")
    row = max(squad.load_rows("validation", DATA, limit=200), key=lambda r: len(r["context"]))
    ids, cut, _ = squad.prompt(row, enc, 128)
    tail = enc.encode_ordinary("\n\nQuestion: " + row["question"].strip()) + enc.encode_ordinary(SEPS["squad"])
    assert cut > 0 and len(ids) + 32 <= 128 and ids[-len(tail):] == tail
    assert ids[:6] == enc.encode_ordinary(HEADS["squad"].rstrip(" "))[:6]


def test_long_target_is_cut_and_ends_with_eot(enc):
    row = {"id": "x", "article": "A short story.", "highlights": "Many words here . " * 200}
    ids, was_cut = tasks.get_task("cnn_dailymail").target_ids(row, enc)
    assert was_cut and len(ids) == 128 and ids[-1] == EOT and EOT not in ids[:-1]
    assert ids[:-1] == enc.encode_ordinary(" " + row["highlights"].strip())[:127]
    squad = tasks.get_task("squad")
    ex = squad.encode_example({"id": "q", "context": "c.", "question": "q?",
                                        "answers": {"text": ["x " * 100], "answer_start": [0]}}, enc, 1024)
    assert ex["target_cut"] and len(ex["target"]) == 32 and ex["target"][-1] == EOT and ex["input_cut"] == 0
    assert squad.target_ids({"answers": {"text": ["Denver Broncos"]}}, enc)[1] is False


def write_jsonl_gz(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_bad_input_gives_clear_errors(tmp_path, enc):
    with pytest.raises(UserError, match="unknown task 'cnn'; valid tasks: cnn_dailymail, squad, sst2"):
        tasks.get_task("cnn")
    with pytest.raises(UserError, match=r"missing data file .*squad/train\.jsonl\.gz.*--data-root"):
        tasks.get_task("squad").load_rows("train", tmp_path)
    write_jsonl_gz(tmp_path / "glue_sst2" / "validation.jsonl.gz", [])
    with pytest.raises(UserError, match="has no rows"):
        tasks.get_task("sst2").load_rows("validation", tmp_path)
    bad = tmp_path / "cnn_dailymail" / "train.jsonl.gz"
    write_jsonl_gz(bad, [{"id": "a", "article": "x.", "highlights": "y"}, {"id": "b", "article": "x."}])
    with pytest.raises(UserError, match=f"cnn_dailymail: {bad} row 2 has no field 'highlights'"):
        tasks.get_task("cnn_dailymail").load_rows("train", tmp_path)
    write_jsonl_gz(tmp_path / "glue_sst2" / "train.jsonl.gz",
                   [{"sentence": "fine", "label": 1, "idx": 0}, {"sentence": "odd", "label": 7, "idx": 1}])
    with pytest.raises(UserError, match=r"sst2: .*train\.jsonl\.gz row 2: .*label 7, expected 0 or 1"):
        prepare_finetune.main(["--tasks", "sst2", "--splits", "train", "--data-root", str(tmp_path),
                               "--out-dir", str(tmp_path / "out"), "--num-proc", "1"])
    with pytest.raises(UserError, match="block size 40 leaves no room"):
        tasks.get_task("cnn_dailymail").prompt({"id": "a", "article": "x."}, enc, 40)


def test_script_prints_one_line_error(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    p = subprocess.run([sys.executable, str(ROOT / "prepare_finetune.py"), "--tasks", "squad",
                        "--data-root", str(tmp_path), "--out-dir", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert p.returncode == 2
    assert p.stderr.startswith("error: missing data file") and p.stderr.count("\n") == 1
    assert not (tmp_path / "out" / "squad" / "meta.json").exists()


def test_unreachable_hub_is_a_user_error(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = "import tasks\ntry:\n tasks.get_task('sst2').load_rows('validation')\nexcept tasks.UserError as e:\n print(e)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert "cannot load nyu-mll/glue split 'validation' from the hub" in p.stdout and "--data-root" in p.stdout


def test_output_is_the_same_for_any_num_proc(tmp_path, prepared):
    run_prepare(tmp_path, "--num-proc", "2")
    files = sorted(p.relative_to(prepared) for p in prepared.rglob("*") if p.is_file())
    assert len(files) == 3 * 7  # per task: meta.json and a .bin and .idx.npy per split (train, select, validation)
    for rel in files:
        assert (tmp_path / rel).read_bytes() == (prepared / rel).read_bytes(), rel
    idx = np.load(prepared / "squad" / "train.idx.npy")
    kept = len(prepared_rows(tasks.get_task("squad"), "train"))
    assert idx.dtype == np.int64 and idx.shape == (kept, 3) and idx[0, 0] == 0
    assert (idx[1:, 0] == idx[:-1, 0] + idx[:-1, 2]).all()
    assert idx[-1, 0] + idx[-1, 2] == os.path.getsize(prepared / "squad" / "train.bin") // 2
