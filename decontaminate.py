"""13-gram overlap between pretraining documents and the finetuning tasks' evaluation texts.

A pretraining document that shares any n consecutive (normalized) words with an evaluation
text is dropped, so pretraining cannot have seen the test articles, contexts or sentences.

Words are normalized by lowercasing, deleting punctuation and splitting on whitespace, so
"The U.S. isn't" and "the us isnt" are the same three words. Each word gets a stable 64-bit
hash (blake2b, not Python's per-process salted hash()), and each run of n words is combined
into one uint64. A text shorter than n words has no n-grams: it contributes nothing to an
index and can never match one.
"""
import functools
import hashlib
import re

import numpy as np

N = 13
_PUNCT = re.compile(r"[^\w\s]|_")  # everything but letters, digits and whitespace
_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd, so each step is invertible mod 2**64


def normalize_words(text):
    """Lowercase, delete punctuation, split on whitespace."""
    return _PUNCT.sub("", text.lower()).split()


@functools.lru_cache(maxsize=1 << 16)  # word frequencies are Zipfian: most lookups hit a small cache
def _word_hash(word):
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def _mix(h):
    """splitmix64's finalizer: spreads the bits of a linear combination over all 64."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def ngram_hashes(text, n=N):
    """uint64 hashes of every run of n consecutive normalized words (empty if fewer words)."""
    words = normalize_words(text)
    if len(words) < n:
        return np.empty(0, dtype=np.uint64)
    w = np.fromiter((_word_hash(x) for x in words), dtype=np.uint64, count=len(words))
    count = len(words) - n + 1
    h = np.zeros(count, dtype=np.uint64)
    for k in range(n):  # polynomial in _MUL over the n words; uint64 arrays wrap silently
        h = h * _MUL + w[k:k + count]
    return _mix(h)


class NgramIndex:
    """A set of n-gram hashes stored as one sorted unique uint64 array (8 bytes per n-gram,
    where a Python set of ints would take ~70)."""

    _MERGE_EVERY = 1 << 22  # fold pending hashes in every ~4M, bounding peak memory

    def __init__(self, texts=(), n=N):
        self.n = n
        self.hashes = np.empty(0, dtype=np.uint64)
        pending, size = [], 0
        for text in texts:
            h = ngram_hashes(text, n)
            pending.append(h)
            size += h.size
            if size >= self._MERGE_EVERY:
                self._merge(pending)
                pending, size = [], 0
        self._merge(pending)

    def _merge(self, parts):
        if parts:
            # sort + drop repeats: np.unique is ~50x slower on large uint64 arrays in numpy 2.4
            h = np.sort(np.concatenate([self.hashes] + parts))
            self.hashes = h[np.concatenate(([True], h[1:] != h[:-1]))]

    def __len__(self):
        return int(self.hashes.size)

    def contains_any(self, text):
        """True if any n-gram of `text` is in the index."""
        if not len(self):
            return False
        h = ngram_hashes(text, self.n)
        if not h.size:
            return False
        h.sort()  # sorted queries let searchsorted narrow each search from the previous one
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self) - 1)
        return bool(np.any(self.hashes[pos] == h))


def eval_texts(task_names=None, data_root=None):
    """Yield each distinct input text of the evaluation splits of the tasks
    (default: every registered task). SQuAD repeats a context for each question, so texts
    are deduplicated by a digest to avoid hashing them again."""
    import tasks  # lazy: only --decontaminate needs the task definitions
    seen = set()
    for task in tasks.task_list(",".join(task_names or [])):
        for split in task.eval_splits:
            for row in task.load_rows(split, data_root=data_root):
                for text in task.inputs(row):
                    key = hashlib.blake2b(text.encode(), digest_size=16).digest()
                    if key not in seen:
                        seen.add(key)
                        yield text


def load_eval_index(task_names=None, data_root=None, n=N):
    """NgramIndex of the evaluation texts of the tasks (every registered task by default);
    data_root=None loads them from the hub, else from <data_root>/<dir>/<split>.jsonl.gz."""
    return NgramIndex(eval_texts(task_names, data_root), n=n)
