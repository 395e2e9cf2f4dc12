"""Raw web-text documents, streamed from local files (.jsonl[.gz] with a "text" field, .parquet,
.txt) or from the Hugging Face hub (OpenWebText). prepare_owt.py tokenizes them for pretraining;
evaluate.py --owt-text scores a model on them."""
import glob
import gzip
import json
import os
import zlib

from common import UserError

HUB_DATASET = "Skylion007/openwebtext"
EXTENSIONS = (".jsonl", ".jsonl.gz", ".parquet", ".txt")
LOCAL_FLAG_ENV = "LLM_LOCAL_DATA_FLAG"  # set by pipeline.py, whose flag for local data is --data-root


def source_files(source):
    """The files a --source names, in a fixed order (the order decides the output)."""
    if any(c in source for c in "*?["):
        files = sorted(f for f in glob.glob(source, recursive=True) if os.path.isfile(f))
        if not files:
            raise UserError(f"--source {source} matches no files; check the pattern")
    elif os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source))
    elif os.path.isfile(source):
        if not source.endswith(EXTENSIONS):
            raise UserError(f"--source {source} is not a {'/'.join(EXTENSIONS)} file; convert it to one")
        return [source]
    else:
        raise UserError(f"--source {source} does not exist; pass a directory, a glob or a file")
    files = [f for f in files if f.endswith(EXTENSIONS) and os.path.isfile(f)]
    if not files:
        raise UserError(f"--source {source} holds no {'/'.join(EXTENSIONS)} files; convert the data to one")
    return files


def read_jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    yield parse_json_line(raw, f"{path} line {lineno}")
    except (OSError, EOFError, zlib.error) as e:  # a damaged or truncated .gz
        raise UserError(f"cannot read {path} ({e}); the file is damaged, fetch or write it again") from None


def parse_json_line(raw, where):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: malformed JSON ({e.msg}, column {e.colno}); fix or delete that line") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise UserError(f'{where} has no "text" string field; each line must be an object like {{"text": "..."}}')
    return row["text"]


def read_parquet(path):
    import pyarrow.parquet as pq  # installed with datasets
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"cannot read {path} as parquet ({type(e).__name__}); check the file") from None
    if "text" not in pf.schema_arrow.names:
        raise UserError(f'{path} has no "text" column; rename the document column to "text"')
    for batch in pf.iter_batches(batch_size=1024, columns=["text"]):  # row groups, never the whole file
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise UserError(f'{path} has a "text" value that is {text!r}, not a string; drop those rows')
            yield text


def read_txt(path):
    with open(path, "rb") as f:
        data = f.read()
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 ({e.reason} at byte {e.start}); re-encode it as UTF-8") from None


def read_hub():
    """Open the hub stream now (so an offline machine fails before any work), read it lazily."""
    def hub_error(e):
        return UserError(f"cannot stream {HUB_DATASET} from the hub ({type(e).__name__}); "
                         f"check the network or pass {os.environ.get(LOCAL_FLAG_ENV, '--source')} with local files")
    try:
        from datasets import load_dataset
        stream = load_dataset(HUB_DATASET, split="train", streaming=True)  # fetches no documents yet
    except Exception as e:  # network and hub errors come in many types
        raise hub_error(e) from None

    def texts():
        try:
            for row in stream:
                yield row["text"]
        except Exception as e:
            raise hub_error(e) from None
    return texts()


def documents(source):
    """Stream the source's document texts in order. Files are resolved now, so a bad path fails early."""
    if source is None:
        return read_hub()
    files = source_files(source)
    readers = {".txt": read_txt, ".parquet": read_parquet}
    texts = (text for path in files for text in readers.get(os.path.splitext(path)[1], read_jsonl)(path))
    return (text for text in texts if text.strip())  # an empty document would be a lone EOT
