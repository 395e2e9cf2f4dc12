"""The finetuning tasks, defined in one place: data loading, prompts, targets and references.

prepare_finetune.py builds training data with these functions and evaluate.py builds its
prompts with them too, so a model is evaluated on byte-for-byte the prompt it was trained on.
Change a prompt only together with TASKS_VERSION (it is stored in meta.json and checkpoints).

Prompt layout (the pieces are tokenized separately and their ids concatenated):

    head       instruction + "\\n\\n" + input_label + ":"      e.g. "...article.\\n\\nArticle:"
    input      " " + article / context / sentence            the only piece that may be cut
    question   "\\n\\nQuestion: " + question                    SQuAD only, never cut
    separator  "\\n\\nSummary:" / "\\n\\nAnswer:" / "\\n\\nSentiment:" never cut
    target     " " + training_target(row), then EOT           capped at max_target_tokens

Because each piece has its own tokens, cutting the input never changes the tokens of the
instruction, the question or the separator, and the separator is the same ids in every example.
Input and target texts are stripped of surrounding whitespace before use.

A long input is cut so that len(prompt) + max_target_tokens <= block_size: after the last
sentence end that fits (the tokens stay a prefix of the input's own tokens; nothing is
re-tokenized), or at a token boundary when no sentence end keeps at least half the room.

Texts vs. tokens: training_target() and references() return plain texts (no leading space);
the model sees TARGET_PREFIX + text. LABEL_WORDS are token strings, so they carry that space:
LABEL_WORDS["sst2"][label] == TARGET_PREFIX + training_target("sst2", row).
"""
import gzip
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from common import EOT, UserError

TASKS_VERSION = 1
TASK_NAMES = ("cnn_dailymail", "squad", "sst2")
EVAL_SPLITS = {"cnn_dailymail": ["validation", "test"], "squad": ["validation"], "sst2": ["validation"]}
LABEL_WORDS = {"sst2": (" negative", " positive")}  # index = label (0 negative, 1 positive)
TARGET_PREFIX = " "  # the target text follows the separator after one space


@dataclass(frozen=True)
class Task:
    name: str
    hub_path: str
    hub_config: Optional[str]
    local_dir: str                   # <data_root>/<local_dir>/<split>.jsonl.gz
    splits: tuple                    # splits that exist
    unlabelled_splits: tuple         # splits without targets (never used for training)
    required_fields: tuple
    max_target_tokens: int           # cap on target length, EOT included
    max_new_tokens: int              # generation length at evaluation
    instruction: str
    input_label: str                 # "Article", "Passage", "Sentence"
    separator: str                   # e.g. "\n\nSummary:" (the target follows after a space)
    question_label: Optional[str] = None


TASKS = {
    "cnn_dailymail": Task(
        name="cnn_dailymail", hub_path="abisee/cnn_dailymail", hub_config="3.0.0",
        local_dir="cnn_dailymail", splits=("train", "validation", "test"), unlabelled_splits=(),
        required_fields=("id", "article", "highlights"),
        max_target_tokens=128, max_new_tokens=128,
        instruction="Summarize the following news article.", input_label="Article",
        separator="\n\nSummary:"),
    "squad": Task(
        name="squad", hub_path="rajpurkar/squad", hub_config=None,
        local_dir="squad", splits=("train", "validation"), unlabelled_splits=(),
        required_fields=("id", "context", "question", "answers"),
        max_target_tokens=32, max_new_tokens=32,
        instruction="Answer the question with a short span copied from the passage.",
        input_label="Passage", question_label="Question", separator="\n\nAnswer:"),
    "sst2": Task(
        name="sst2", hub_path="nyu-mll/glue", hub_config="sst2",
        local_dir="glue_sst2", splits=("train", "validation", "test"), unlabelled_splits=("test",),
        required_fields=("idx", "sentence", "label"),
        max_target_tokens=2, max_new_tokens=2,
        instruction="Is the sentiment of this sentence positive or negative?", input_label="Sentence",
        separator="\n\nSentiment:"),
}
assert tuple(TASKS) == TASK_NAMES


def get_task(name):
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    return TASKS[name]


# ----------------------------------------------------------------------------- loading

def local_file(task_name, split, data_root):
    """The local file for a split: <data_root>/<local_dir>/<split>.jsonl.gz, else .jsonl (None if neither)."""
    base = os.path.join(data_root, get_task(task_name).local_dir, split)
    for path in (base + ".jsonl.gz", base + ".jsonl"):
        if os.path.isfile(path):
            return path
    return None


def load_rows(task_name, split, data_root=None, limit=None):
    """The rows of one split as dicts: from the hub, or from <data_root>/<local_dir>/<split>.jsonl[.gz]."""
    task = get_task(task_name)
    if data_root is None:
        rows, source = _load_hub(task, split, limit), f"{task.hub_path} split {split!r}"
    else:
        path = local_file(task_name, split, data_root)
        if path is None:
            want = os.path.join(data_root, task.local_dir, split + ".jsonl.gz")
            raise UserError(f"missing data file {want} (or .jsonl); point --data-root at the folder "
                            f"holding {task.local_dir}/, or leave it out to load from the hub")
        rows, source = _load_jsonl(path, limit), path
    if not rows:
        raise UserError(f"{task_name} split {split!r} in {source} has no rows; check the file or the split name")
    for i, row in enumerate(rows):
        for field in task.required_fields:
            if field not in row or row[field] is None:
                raise UserError(f"{task_name}: {source} row {i + 1} has no field {field!r}; "
                                f"each row needs {', '.join(task.required_fields)}")
        if task_name == "squad" and not (isinstance(row["answers"], dict) and row["answers"].get("text")):
            raise UserError(f"squad: {source} row {i + 1} has no answers.text; each row needs at least one answer")
    return rows


def _load_jsonl(path, limit):
    rows = []
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if limit is not None and len(rows) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {line_no} is not valid JSON ({e.msg}); fix or re-create the file")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); re-create the file")
    return rows


def _load_hub(task, split, limit):
    import datasets
    try:
        ds = datasets.load_dataset(task.hub_path, task.hub_config, split=split)
    except Exception as e:  # offline, unknown split, ...: many exception types
        raise UserError(f"cannot load {task.hub_path} split {split!r} from the hub ({type(e).__name__}); "
                        f"offline, pass --data-root DIR holding {task.local_dir}/{split}.jsonl.gz")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]


# ----------------------------------------------------------------------------- row fields

def label_index(row):
    """SST-2 label as 0/1 (the files may hold it as int or as a string like '1'); UserError otherwise."""
    label = row.get("label")
    try:
        value = int(label)
    except (TypeError, ValueError):
        value = None
    if value not in (0, 1) or isinstance(label, float) and label != value:
        raise UserError(f"sst2 example idx={row.get('idx')!r} has label {label!r}, expected 0 or 1 "
                        f"(test rows are unlabelled: use train or validation)")
    return value


def source_texts(task_name, row):
    """The example's input texts, as used in the prompt (for decontaminating pretraining data)."""
    get_task(task_name)
    if task_name == "cnn_dailymail":
        return [row["article"].strip()]
    if task_name == "squad":
        return [row["context"].strip(), row["question"].strip()]
    return [row["sentence"].strip()]


def example_id(task_name, row):
    get_task(task_name)
    return str(row["idx"] if task_name == "sst2" else row["id"])


def references(task_name, row):
    """Reference texts for scoring (plain text, no leading space)."""
    get_task(task_name)
    if task_name == "cnn_dailymail":
        return [row["highlights"].strip()]
    if task_name == "squad":
        return [t.strip() for t in row["answers"]["text"]]
    return [LABEL_WORDS["sst2"][label_index(row)].strip()]


def training_target(task_name, row):
    """The text the model learns to write after the separator (plain text; TARGET_PREFIX is added)."""
    return references(task_name, row)[0]


# ----------------------------------------------------------------------------- tokens

_SENTENCE_END = re.compile(rb"[.!?][\"')\]]*$")
_ABBREVIATION = re.compile(rb"(?:^|[\s(\"'])(?:[A-Za-z]|Mr|Mrs|Ms|Dr|St|Jr|Sr|vs|No|Gen|Sen|Rep|Gov|Lt|Col|"
                           rb"Sgt|Capt|Prof|Inc|Co|Corp|Jan|Feb|Aug|Sept|Oct|Nov|Dec)\.$")


def _cut_point(enc, ids, budget):
    """How many of `ids` to keep (<= budget): after the last sentence end that keeps at least half
    the budget, else exactly `budget` (a token boundary)."""
    for k in range(budget, max(budget // 2, 1) - 1, -1):
        nxt = enc.decode_single_token_bytes(ids[k])  # k < len(ids) since we only cut long inputs
        if not nxt[:1].isspace():
            continue
        tail = b"".join(enc.decode_single_token_bytes(t) for t in ids[max(k - 4, 0):k])
        if _SENTENCE_END.search(tail) and not _ABBREVIATION.search(tail.rstrip(b"\"')]")):
            return k
    return budget


def _pieces(task, row):
    """(head, input, question or None, separator) texts of the prompt."""
    head = f"{task.instruction}\n\n{task.input_label}:"
    texts = source_texts(task.name, row)
    question = f"\n\n{task.question_label}: {texts[1]}" if task.question_label else None
    return head, " " + texts[0], question, task.separator


def prompt_text(task_name, row):
    """The whole prompt as text, before any cutting (for reading and debugging)."""
    return "".join(p for p in _pieces(get_task(task_name), row) if p is not None)


def prompt_ids(task_name, row, enc, block_size):
    """The prompt's token ids and how many input tokens were cut to leave room for the target.

    Depends only on the row's inputs and block_size (never on the target)."""
    task = get_task(task_name)
    head, text, question, separator = _pieces(task, row)
    head_ids, input_ids, sep_ids = enc.encode_ordinary(head), enc.encode_ordinary(text), enc.encode_ordinary(separator)
    question_ids = enc.encode_ordinary(question) if question is not None else []
    budget = block_size - task.max_target_tokens - len(head_ids) - len(question_ids) - len(sep_ids)
    if budget < 1:
        raise UserError(f"block size {block_size} leaves no room for the {task_name} input "
                        f"(example {example_id(task_name, row)}); use a larger --block-size")
    cut = 0
    if len(input_ids) > budget:
        keep = _cut_point(enc, input_ids, budget)
        cut, input_ids = len(input_ids) - keep, input_ids[:keep]
    return head_ids + input_ids + question_ids + sep_ids, cut


def target_ids(task_name, row, enc):
    """TARGET_PREFIX + training target, then EOT, capped at max_target_tokens (a cut target still
    ends with EOT). Returns (ids, was_cut)."""
    task = get_task(task_name)
    ids = enc.encode_ordinary(TARGET_PREFIX + training_target(task_name, row))
    room = task.max_target_tokens - 1
    return ids[:room] + [EOT], len(ids) > room


def encode_example(task_name, row, enc, block_size):
    prompt, input_cut = prompt_ids(task_name, row, enc, block_size)
    target, target_cut = target_ids(task_name, row, enc)
    return dict(prompt=prompt, target=target, input_cut=input_cut, target_cut=target_cut)


# ----------------------------------------------------------------------------- prepared data

class FinetuneSplit:
    """One prepared split, e.g. FinetuneSplit("data/finetune/squad/train"): reads <prefix>.bin
    (uint16 tokens) and <prefix>.idx.npy (int64 rows [offset, prompt_len, length])."""

    def __init__(self, path_prefix):
        bin_path, idx_path = path_prefix + ".bin", path_prefix + ".idx.npy"
        for p in (bin_path, idx_path):
            if not os.path.isfile(p):
                raise UserError(f"missing {p}; run prepare_finetune.py first")
        self.index = np.load(idx_path)
        self.tokens = np.memmap(bin_path, dtype=np.uint16, mode="r")

    def __len__(self):
        return len(self.index)

    def example(self, i):
        """(int64 tokens = prompt + target, prompt_len); the loss goes on tokens[prompt_len:]."""
        offset, prompt_len, length = (int(v) for v in self.index[i])
        return np.asarray(self.tokens[offset:offset + length], dtype=np.int64), prompt_len
