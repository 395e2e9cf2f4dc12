"""13-gram overlap between pretraining documents and the finetuning tasks' evaluation texts.

A pretraining document that shares any n consecutive (normalized) words with an evaluation
text is dropped, so pretraining cannot have seen the test articles, contexts or sentences.

Words are normalized by lowercasing, deleting punctuation and splitting on whitespace, so
"The U.S. isn't" and "the us isnt" are the same three words. Each word gets a stable 64-bit
hash (blake2b, not Python's per-process salted hash()), and each run of n words is combined
into one uint64. An evaluation text shorter than n words has no n-gram, so it is matched
whole instead: a document containing its MIN_WORDS..n-1 normalized words as one run is dropped
(most SST-2 sentences and SQuAD questions are that short). Texts under MIN_WORDS words ("a
great film") are too common to mean contamination; they are counted, not matched.
"""
import functools
import hashlib
import re

import numpy as np

N = 13
MIN_WORDS = 5  # shortest evaluation text matched whole
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


def _word_hashes(words):
    return np.fromiter((_word_hash(x) for x in words), dtype=np.uint64, count=len(words))


def _runs(w, lengths):
    """Yield (k, unmixed hashes of every run of k consecutive words) for k = 1..max(lengths),
    for the k in lengths. Each k extends the k-1 runs by one word (a polynomial in _MUL; uint64
    arrays wrap silently), so all lengths cost what the longest alone does."""
    h = w
    for k in range(1, max(lengths) + 1):
        if k > 1:
            h = h[:-1] * _MUL + w[k - 1:]
        if k in lengths and h.size:
            yield k, h


def ngram_hashes(text, n=N):
    """uint64 hashes of every run of n consecutive normalized words (empty if fewer words)."""
    words = normalize_words(text)
    if len(words) < n:
        return np.empty(0, dtype=np.uint64)
    return _mix(dict(_runs(_word_hashes(words), {n}))[n])


def text_hash(words):
    """The hash of a whole text of fewer than n words, as _runs hashes a run of that length."""
    return int(_mix(dict(_runs(_word_hashes(words), {len(words)}))[len(words)])[0])


def _sorted_unique(arrays):
    # sort + drop repeats: np.unique is ~50x slower on large uint64 arrays in numpy 2.4
    h = np.sort(np.concatenate(arrays))
    return h[np.concatenate(([True], h[1:] != h[:-1]))] if h.size else h


def _member(sorted_hashes, h):
    """True if any of h is in sorted_hashes."""
    h = np.sort(h)  # sorted queries let searchsorted narrow each search from the previous one
    pos = np.minimum(np.searchsorted(sorted_hashes, h), len(sorted_hashes) - 1)
    return bool(np.any(sorted_hashes[pos] == h))


class NgramIndex:
    """The n-grams of the long evaluation texts, stored as one sorted unique uint64 array (8 bytes
    per n-gram, where a Python set of ints would take ~70), and the whole-text hashes of the short
    ones (MIN_WORDS..n-1 words), one sorted array per length."""

    _MERGE_EVERY = 1 << 22  # fold pending hashes in every ~4M, bounding peak memory

    def __init__(self, texts=(), n=N, min_words=MIN_WORDS):
        self.n, self.min_words = n, min_words
        self.hashes = np.empty(0, dtype=np.uint64)
        self.too_short = 0  # texts under min_words: counted, never matched
        pending, size, short = [], 0, {}
        for text in texts:
            words = normalize_words(text)
            if len(words) >= n:
                pending.append(ngram_hashes(text, n))
                size += pending[-1].size
            elif len(words) >= min_words:
                short.setdefault(len(words), []).append(text_hash(words))
            else:
                self.too_short += 1
            if size >= self._MERGE_EVERY:
                self._merge(pending)
                pending, size = [], 0
        self._merge(pending)
        self.short = {k: _sorted_unique([np.array(v, dtype=np.uint64)]) for k, v in short.items()}

    def _merge(self, parts):
        if parts:
            self.hashes = _sorted_unique([self.hashes] + parts)

    def __len__(self):
        return int(self.hashes.size)

    @property
    def short_texts(self):
        """Distinct short texts matched whole."""
        return sum(int(h.size) for h in self.short.values())

    def contains_any(self, text):
        """True if any n-gram of `text` is in the index, or any short evaluation text appears in it
        as a run of whole words."""
        words = normalize_words(text)
        lengths = {k for k in self.short if k <= len(words)}
        if len(self) and len(words) >= self.n:
            lengths.add(self.n)
        if not lengths:
            return False
        for k, h in _runs(_word_hashes(words), lengths):
            if _member(self.hashes if k == self.n else self.short[k], _mix(h)):
                return True
        return False


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
