"""Small helpers shared by every script: one-line user errors, atomic writes, the tokenizer."""
import json
import os
import sys
import tempfile
from contextlib import contextmanager

EOT = 50256  # GPT-2's <|endoftext|>


class UserError(Exception):
    """A problem the user can fix; scripts print it as one line, without a traceback."""


def run_main(main):
    """Call main() and turn a UserError into `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds,
    so a killed run never leaves a file that looks complete."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def torch_save(obj, path):
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def get_tokenizer():
    """GPT-2 BPE. Offline machines set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # network errors come in many types
        raise UserError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}); offline, set "
                        f"TIKTOKEN_CACHE_DIR to a folder with tiktoken's gpt2 files (e.g. ../shared/tiktoken)")
