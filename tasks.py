"""The finetuning tasks, each one object that carries everything task-specific: loading, prompt
and target, truncation, stop tokens, decoding, scorer and baseline. Every other file iterates
over the registry TASKS, so a new task is one register(...) call (see tests/test_tasks.py).

prepare_finetune.py builds training data with Task.prompt / Task.target_ids and evaluate.py
builds its prompts with Task.prompt too, so a model is evaluated on byte-for-byte the prompt it
was trained on. Change a prompt only together with TASKS_VERSION (stored in meta.json and
checkpoints).

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
the model sees TARGET_PREFIX + text. A classification task's label_words are token strings, so
they carry that space: label_words[label] == TARGET_PREFIX + training_target(row).
"""
import gzip
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

import subsets
from common import EOT, UserError

TASKS_VERSION = 1
TARGET_PREFIX = " "  # the target text follows the separator after one space
NEWLINES = (198, 628)  # "\n" and "\n\n"
OWN_INPUT = "your input"  # the example id of a row made from text of one's own (Task.row_of)


class Prompt(NamedTuple):
    ids: list  # token ids of the whole prompt
    cut: int  # input tokens cut to leave room for the target
    input_span: tuple  # (start, end) of the (possibly cut) input within ids


@dataclass(frozen=True)
class Task:
    """What every task has. Subclasses say how a row becomes inputs, references and scores."""
    name: str
    hub_path: str
    hub_config: Optional[str]
    local_dir: str                   # <data_root>/<local_dir>/<split>.jsonl.gz
    splits: tuple                    # splits that exist
    eval_splits: tuple               # splits with references, for scoring (the first is the default)
    required_fields: tuple
    max_target_tokens: int           # cap on target length, EOT included
    max_new_tokens: int              # generation length at evaluation
    instruction: str
    input_label: str                 # "Article", "Passage", "Sentence"
    separator: str                   # e.g. "\n\nSummary:" (the target follows after a space)
    unlabelled_splits: tuple = ()    # splits without targets (never used for training)
    question_label: Optional[str] = None
    id_field: str = "id"
    stop_tokens: tuple = (EOT,)      # generation ends at any of these
    label_words: Optional[tuple] = None  # classification: scored by label likelihood, nothing generated
    extractive: bool = False         # answers are spans of the input (allows --constrained decoding)
    report_metrics: tuple = ()       # score columns in REPORT.md, in order
    anchors: tuple = ()              # (published system, {metric: value}) reference points
    zero_shot_separator: Optional[str] = None  # zero-shot prompt: the bare input, then this (GPT-2's TL;DR)
    example_unit: str = "example"    # what one row is, for REPORT.md ("question", "sentence", ...)
    stratified_by: Optional[str] = None  # what stratum(row) is, in words (None: --limit draws unstratified)
    cluster_field: Optional[str] = None  # rows sharing this field's value are not independent: the
    # bootstrap resamples these clusters (SQuAD: "title", the article), and predictions carry the field

    def inputs(self, row):
        """The example's input texts as used in the prompt (also what decontamination looks for)."""
        raise NotImplementedError

    def row_of(self, texts):
        """A row whose inputs() are `texts` (and that has no references): how text of one's own is
        prompted exactly as the data is (sample.py --task)."""
        raise NotImplementedError

    def references(self, row):
        """Reference texts for scoring (plain text, no leading space)."""
        raise NotImplementedError

    def score(self, predictions, references):
        raise NotImplementedError

    def baseline(self, rows, data_root=None, split=None):
        """{"name", "scores"} of a trivial baseline, scored by the same code as the model."""
        raise NotImplementedError

    def check_row(self, row):
        """Raise UserError(reason) when a row cannot be used (beyond missing fields)."""

    def example_id(self, row):
        return str(row[self.id_field])

    def stratum(self, row):
        """The row's stratum for a representative --limit sample (None: no strata)."""
        return None

    def sample_indices(self, rows, n=None, seed=subsets.SEED):
        """Indices (ascending) of a seeded sample of n rows stratified by stratum() (subsets.py);
        all of them when n is None."""
        return subsets.stratified_indices([self.stratum(r) for r in rows], len(rows) if n is None else n, seed)

    def subset(self, rows, n=None, seed=subsets.SEED):
        """(rows, record): the rows of sample_indices, in the split's order, and the record that
        describes the sample for the metrics JSON."""
        chosen = self.sample_indices(rows, n, seed)
        record = subsets.describe([self.stratum(r) for r in rows], chosen, [self.example_id(rows[i]) for i in chosen],
                                  seed, self.stratified_by)
        return [rows[i] for i in chosen], record

    def holdout_key(self, row):
        """The text that ties examples together (an article, a SQuAD passage, a sentence): a slice
        held out of a split takes all the examples of a text or none, so none of its texts is trained on."""
        return self.inputs(row)[0]

    def training_target(self, row):
        """The text the model learns to write after the separator (TARGET_PREFIX is added)."""
        return self.references(row)[0]

    # ------------------------------------------------------------------------- tokens

    def _pieces(self, row):
        """(head, input, question or None, separator) texts of the prompt."""
        texts = self.inputs(row)
        question = f"\n\n{self.question_label}: {texts[1]}" if self.question_label else None
        if self.instruction is None:  # a bare format (zero_shot_separator): the text, then the separator
            return "", texts[0], question, self.separator
        return f"{self.instruction}\n\n{self.input_label}:", " " + texts[0], question, self.separator

    def prompt_text(self, row):
        """The whole prompt as text, before any cutting (for reading and debugging)."""
        return "".join(p for p in self._pieces(row) if p is not None)

    def prompt(self, row, enc, block_size):
        """The prompt's ids, cut so that the longest target still fits in block_size. Depends only
        on the row's inputs and block_size (never on the target)."""
        head, text, question, separator = self._pieces(row)
        head_ids, input_ids, sep_ids = (enc.encode_ordinary(t) for t in (head, text, separator))
        question_ids = enc.encode_ordinary(question) if question is not None else []
        budget = block_size - self.max_target_tokens - len(head_ids) - len(question_ids) - len(sep_ids)
        if budget < 1:
            raise UserError(f"block size {block_size} leaves no room for the {self.name} input "
                            f"(example {self.example_id(row)}); use a larger --block-size")
        cut = 0
        if len(input_ids) > budget:
            keep = _cut_point(enc, input_ids, budget)
            cut, input_ids = len(input_ids) - keep, input_ids[:keep]
        span = (len(head_ids), len(head_ids) + len(input_ids))
        return Prompt(head_ids + input_ids + question_ids + sep_ids, cut, span)

    def target_ids(self, row, enc):
        """TARGET_PREFIX + training target, then EOT, capped at max_target_tokens (a cut target
        still ends with EOT). Returns (ids, was_cut)."""
        ids = enc.encode_ordinary(TARGET_PREFIX + self.training_target(row))
        room = self.max_target_tokens - 1
        return ids[:room] + [EOT], len(ids) > room

    def encode_example(self, row, enc, block_size):
        prompt = self.prompt(row, enc, block_size)
        target, target_cut = self.target_ids(row, enc)
        return dict(prompt=prompt.ids, target=target, input_cut=prompt.cut, target_cut=target_cut)

    # ------------------------------------------------------------------------- loading

    def local_file(self, split, data_root):
        """<data_root>/<local_dir>/<split>.jsonl.gz, else .jsonl (None if neither)."""
        base = os.path.join(data_root, self.local_dir, split)
        return next((p for p in (base + ".jsonl.gz", base + ".jsonl") if os.path.isfile(p)), None)

    def source_name(self, split, data_root):
        if data_root:
            return self.local_file(split, data_root)
        return f"hub:{self.hub_path}" + (f"/{self.hub_config}" if self.hub_config else "") + f" split {split}"

    def load_rows(self, split, data_root=None, limit=None):
        """The rows of one split as dicts: from the hub, or from <data_root>/<local_dir>/<split>.jsonl[.gz].
        limit: only the first N rows, read cheaply (smoke-sized training data, the few-shot pool);
        a scored subset is subset() of all the rows, from either source."""
        if data_root is None:
            rows, source = _load_hub(self, split, limit), f"{self.hub_path} split {split!r}"
        else:
            source = self.local_file(split, data_root)
            if source is None:
                want = os.path.join(data_root, self.local_dir, split + ".jsonl.gz")
                raise UserError(f"missing data file {want} (or .jsonl); point --data-root at the folder "
                                f"holding {self.local_dir}/, or leave it out to load from the hub")
            rows = _load_jsonl(source, limit)
        if not rows:
            raise UserError(f"{self.name} split {split!r} in {source} has no rows; check the file or the split name")
        for i, row in enumerate(rows):
            missing = [f for f in self.required_fields if f not in row or row[f] is None]
            if missing:
                raise UserError(f"{self.name}: {source} row {i + 1} has no field {missing[0]!r}; "
                                f"each row needs {', '.join(self.required_fields)}")
            if split not in self.unlabelled_splits:
                try:
                    self.check_row(row)
                except UserError as e:
                    raise UserError(f"{self.name}: {source} row {i + 1}: {e}") from None
        return rows


@dataclass(frozen=True)
class Summarization(Task):
    input_field: str = "article"
    target_field: str = "highlights"
    report_metrics: tuple = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu")
    example_unit: str = "article"
    stratified_by: Optional[str] = "source (CNN or Daily Mail, read from the URL, else the article's opening)"

    def inputs(self, row):
        return [row[self.input_field].strip()]

    def row_of(self, texts):
        (text,) = texts
        return {self.id_field: OWN_INPUT, self.input_field: text}

    def references(self, row):
        return [row[self.target_field].strip()]

    def stratum(self, row):
        return news_source(row.get("url"), row[self.input_field])

    def score(self, predictions, references):
        import metrics
        return metrics.summarization_scores(predictions, [r[0] for r in references])

    def baseline(self, rows, data_root=None, split=None):
        import metrics
        preds = [metrics.lead3(self.inputs(r)[0]) for r in rows]
        return {"name": "lead-3", "scores": self.score(preds, [self.references(r) for r in rows])}


@dataclass(frozen=True)
class ExtractiveQA(Task):
    stop_tokens: tuple = (EOT, *NEWLINES)  # an answer is one line
    extractive: bool = True
    report_metrics: tuple = ("exact_match", "f1")
    example_unit: str = "question"
    stratified_by: Optional[str] = "article (title)"
    cluster_field: Optional[str] = "title"  # an article's questions share its passages

    def stratum(self, row):
        return row.get("title")

    def inputs(self, row):
        return [row["context"].strip(), row["question"].strip()]

    def row_of(self, texts):
        context, question = texts
        return {self.id_field: OWN_INPUT, "context": context, "question": question}

    def references(self, row):
        return [t.strip() for t in row["answers"]["text"]]

    def check_row(self, row):
        if not (isinstance(row["answers"], dict) and row["answers"].get("text")):
            raise UserError("it has no answers.text; each row needs at least one answer")

    def score(self, predictions, references):
        import metrics
        return metrics.squad_scores(predictions, references)

    def baseline(self, rows, data_root=None, split=None):
        import metrics
        preds = [metrics.question_overlap_sentence(*self.inputs(r)) for r in rows]
        return {"name": "question-overlap sentence", "scores": self.score(preds, [self.references(r) for r in rows])}


@dataclass(frozen=True)
class Classification(Task):
    input_field: str = "sentence"
    report_metrics: tuple = ("accuracy",)
    example_unit: str = "sentence"

    def inputs(self, row):
        return [row[self.input_field].strip()]

    def row_of(self, texts):
        (text,) = texts
        return {self.id_field: OWN_INPUT, self.input_field: text}

    def label(self, row):
        """The label as an index into label_words (files may hold it as int or string like '1')."""
        label = row.get("label")
        try:
            value = int(label)
        except (TypeError, ValueError):
            value = None
        if value not in range(len(self.label_words)) or isinstance(label, float) and label != value:
            raise UserError(f"{self.name} example {self.id_field}={row.get(self.id_field)!r} has label {label!r}, "
                            f"expected {' or '.join(map(str, range(len(self.label_words))))} (test rows are "
                            f"unlabelled: use train or validation)")
        return value

    def check_row(self, row):
        self.label(row)

    def references(self, row):
        return [self.label_words[self.label(row)].strip()]

    def score(self, predictions, references):
        import metrics
        return metrics.accuracy(predictions, [r[0] for r in references])

    def baseline(self, rows, data_root=None, split=None):
        import metrics
        labels = [self.label(r) for r in rows]
        try:
            train = self.load_rows("train", data_root)
            majority, source = metrics.majority_label([self.label(r) for r in train]), "train split"
        except UserError as e:
            print(f"warning: {self.name} train labels unavailable ({e}); the majority baseline uses the "
                  f"{split} labels instead", file=sys.stderr)
            majority, source = metrics.majority_label(labels), f"{split} split (train unavailable)"
        word = self.label_words[majority].strip()
        return {"name": f"majority class ({word}, from {source})",
                "scores": self.score([word] * len(rows), [self.references(r) for r in rows])}


TASKS = {}


def register(task):
    """Add a task to the registry (replacing one of the same name)."""
    TASKS[task.name] = task
    return task


register(Summarization(
    name="cnn_dailymail", hub_path="abisee/cnn_dailymail", hub_config="3.0.0", local_dir="cnn_dailymail",
    splits=("train", "validation", "test"), eval_splits=("test", "validation"),
    required_fields=("id", "article", "highlights"), max_target_tokens=128, max_new_tokens=128,
    instruction="Summarize the following news article.", input_label="Article", separator="\n\nSummary:",
    zero_shot_separator="\nTL;DR:", anchors=(("Lead-3, full CNN+DM test (See et al. 2017, \"Get To The Point\")",
              {"rouge1": 40.34, "rouge2": 17.70, "rougeLsum": 36.57}),
             ("GPT-2 1.5B zero-shot \"TL;DR:\", top-k=2 sampling, first 3 sentences, CNN+DM test "
              "(Radford et al. 2019, Table 4)",
              {"rouge1": 29.34, "rouge2": 8.27, "rougeLsum": 26.58}))))
register(ExtractiveQA(
    name="squad", hub_path="rajpurkar/squad", hub_config=None, local_dir="squad",
    splits=("train", "validation"), eval_splits=("validation",),
    required_fields=("id", "context", "question", "answers"), max_target_tokens=32, max_new_tokens=32,
    instruction="Answer the question with a short span copied from the passage.",
    input_label="Passage", question_label="Question", separator="\n\nAnswer:",
    anchors=(("BERT-base, SQuAD v1.1 dev (Devlin et al. 2019)", {"exact_match": 80.8, "f1": 88.5}),)))
register(Classification(
    name="sst2", hub_path="nyu-mll/glue", hub_config="sst2", local_dir="glue_sst2",
    splits=("train", "validation", "test"), eval_splits=("validation",), unlabelled_splits=("test",),
    required_fields=("idx", "sentence", "label"), id_field="idx", max_target_tokens=2, max_new_tokens=2,
    instruction="Is the sentiment of this sentence positive or negative?", input_label="Sentence",
    separator="\n\nSentiment:", label_words=(" negative", " positive"),  # index = label
    anchors=(("BERT-base, GLUE SST-2 test (Devlin et al. 2019)", {"accuracy": 93.5}),)))


def get_task(name):
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def task_list(names):
    """Task objects from a comma-separated string of names ("" or "all": every registered task)."""
    names = [n.strip() for n in names.split(",") if n.strip()]
    if not names or names == ["all"]:
        return list(TASKS.values())
    return [get_task(n) for n in names]


# ----------------------------------------------------------------------------- strata

def news_source(url, article):
    """A CNN/DM story's source, "cnn" or "dailymail". The hub's ids are SHA-1s of the URL, so
    without a url field the article tells: CNN stories credit "(CNN)" (or a partner, "(The
    Hollywood Reporter)") at their start, Daily Mail ones do not. On the 10,000 test rows this finds 1,063 CNN stories, all
    among the first 1,065 rows, where the HF split has its CNN block (two CNN Student News
    transcripts, which credit no one, count as Daily Mail)."""
    if url:
        return "cnn" if "cnn.com" in url else "dailymail"
    opening = article.lstrip()[:200]
    return "cnn" if "(CNN)" in opening or opening.startswith("(") else "dailymail"


# ----------------------------------------------------------------------------- loading

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


# ----------------------------------------------------------------------------- truncation

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


# ----------------------------------------------------------------------------- prepared data

SELECTION_SPLIT = "select"  # prepared beside train, held out of it: finetune.py chooses model.pt on it


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
