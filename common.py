"""Small helpers shared by every script: one-line user errors, atomic writes, the tokenizer."""
import json
import os
import re
import sys
import tempfile
from contextlib import contextmanager

# Waiting OpenMP threads spin by default, taking cores from any other busy process: PASSIVE
# was never slower and up to 4x faster (bench/bench_omp.py, README). OpenMP reads the variable
# once, as torch loads it, so the scripts import this module before torch. A user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EOT = 50256  # GPT-2's <|endoftext|>
TEMPORARY = re.compile(r".+\.(\d+)-[a-z0-9_]{8}\.tmp")  # atomic_path's: <name>.<pid>-<random>.tmp


class UserError(Exception):
    """A problem the user can fix; scripts print it as one line, without a traceback."""


def human(n):
    """A count for people: 1.31B, 10.24k."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def check_choices(config, choices):
    """ValueError naming the first field of config whose value is not among its choices ({field: allowed})."""
    for field, allowed in choices.items():
        if getattr(config, field) not in allowed:
            raise ValueError(f"{field}={getattr(config, field)!r}; choose one of {allowed}")


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
    remove_stale_temporaries(path)
    # the writer's pid is in the name, so that a later run can tell a killed writer's leftovers
    fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(path)}.{os.getpid()}-", suffix=".tmp", dir=directory)
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


def remove_stale_temporaries(path):
    """Delete the temporaries in path's folder left by writers that were killed (their process is
    gone), and any of path's own from before writers named their pid; a live writer's are kept."""
    directory, base = os.path.split(os.path.abspath(path))
    old_style = re.compile(re.escape(base) + r"\.[a-z0-9_]{8}\.tmp")
    for name in os.listdir(directory):
        ours = TEMPORARY.fullmatch(name)
        if (ours and not pid_alive(int(ours.group(1)))) or old_style.fullmatch(name):
            try:
                os.remove(os.path.join(directory, name))
            except FileNotFoundError:  # another rerun removed it first
                pass


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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


# ---- process pools ------------------------------------------------------------------------------
# A Pool replaces a worker whose initializer raises, forever. So initializers run guarded: the
# error is kept, and the worker's first task raises it, which ends the whole command with it.

_worker_error = None


def guarded_init(init, *args):
    global _worker_error
    try:
        init(*args)
    except Exception as e:  # any failure: the parent re-raises it from the first task
        _worker_error = e if isinstance(e, UserError) else UserError(f"a worker could not start ({type(e).__name__}: {e})")


def check_worker():
    """Call first in every pool task: raises the initializer's error, if it had one."""
    if _worker_error is not None:
        raise _worker_error
