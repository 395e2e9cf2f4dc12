"""The docs cannot go stale: every command in README.md and docs/*.md must still run as written.

For each `python X.py ...` and `torchrun ... X.py ...` in a fenced shell block: the script exists,
every `--flag` and `--key=value` is one the script accepts (as its own `--help` lists them), and
every `config/*.py` named exists. Every repository file the prose names in backticks or links to
exists, and every link's #anchor is a heading of its page. A renamed flag fails here, not in a
reader's terminal.
"""
import dataclasses
import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SHELLS = ("bash", "sh", "shell", "console")
FLAG = re.compile(r"--[A-Za-z0-9][\w-]*")
# what the prose may name as part of the repository: a path in one of its folders, or a script by
# its bare name (outputs live in out/ and data/; REPORT.md or merges.txt are outputs too)
REPO_PATH = re.compile(r"^(?:(?:bench|tests|config|docs|\.ci)/[\w./-]+|[\w-]+\.py)$")


def shell_blocks(text):
    """(first line number, lines) of every fenced shell block."""
    blocks, lang, start, body = [], None, 0, []
    for n, line in enumerate(text.split("\n"), 1):
        fence = re.match(r"^\s*```(\w*)", line)
        if fence and lang is None:
            lang, start, body = fence.group(1) or "text", n + 1, []
        elif fence:
            if lang in SHELLS:
                blocks.append((start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def inline_commands(text):
    """(line, `python ...` or `torchrun ...` in backticks in the prose, as one line)."""
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    return [(prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in re.finditer(r"`((?:python|torchrun) [^`]+)`", prose)]


def commands(text):
    """(line, argv) of every simple command in the shell blocks and inline in the prose:
    continuations joined, comments, environment assignments and `do`/`then` dropped, split at
    && || ; | and &."""
    out = []
    for start, body in shell_blocks(text) + [(n, [cmd]) for n, cmd in inline_commands(text)]:
        joined, first = "", None
        for n, line in enumerate(body, start):
            first = n if first is None else first
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            joined += line
            lexer = shlex.shlex(joined, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, "#"
            argv = []
            for token in list(lexer) + [";"]:
                if token and set(token) <= set(";&|"):
                    while argv and (re.match(r"^\w+=", argv[0]) or argv[0] in ("do", "then", "export")):
                        argv.pop(0)
                    if argv:
                        out.append((first, argv))
                    argv = []
                else:
                    argv.append(token)
            joined, first = "", None
    return out


def script_call(argv):
    """(script, its arguments) of a python or torchrun command, else None."""
    if argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
        return argv[1], argv[2:]
    if argv[0] == "torchrun":
        i = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
        return (argv[i], argv[i + 1:]) if i is not None else None
    if argv[0] == "bash" and len(argv) > 1 and argv[1].endswith(".sh"):
        return argv[1], []
    return None


@functools.lru_cache(maxsize=None)
def accepted_flags(script):
    """The flags a script's own --help lists."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, f"{script} --help failed: {done.stderr[-500:]}"
    return frozenset(FLAG.findall(done.stdout)) | {"--help", "-h"}


@functools.lru_cache(maxsize=None)
def pipeline_keys():
    sys.path.insert(0, str(ROOT))
    import pipeline
    return frozenset(f"--{f.name}" for f in dataclasses.fields(pipeline.PipelineConfig))


def problems(argv):
    """What is wrong with one documented command (empty when it runs as written)."""
    call = script_call(argv)
    if call is None:
        return []
    script, args = call
    if os.path.isabs(script) or "$" in script:
        return []  # a script from elsewhere (an old commit's archive): not this repository's
    if not (ROOT / script).is_file():
        return [f"{script} does not exist"]
    if script.endswith(".sh"):
        return []
    found, flags = [], accepted_flags(script)
    after_dashdash = False
    for arg in args:
        if arg == "--":
            after_dashdash = True  # pipeline.py: what follows overrides the preset's keys
            continue
        key = arg.split("=", 1)[0]
        if FLAG.fullmatch(key):
            known = pipeline_keys() if after_dashdash and script == "pipeline.py" else flags
            if key not in known:
                found.append(f"{script} does not accept {key}")
        elif re.match(r"^config/[\w./-]+\.py$", arg) and not (ROOT / arg).is_file():
            found.append(f"{arg} does not exist")
    return found


def named_paths(text):
    """Repository paths the prose names in `backticks` (not inside code blocks)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return {m for m in re.findall(r"`([^`\s]+)`", prose) if REPO_PATH.match(m)}


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    return {slug(h) for h in re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), re.M)}


def broken_links(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            found.append(f"link to {target}: {file} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            found.append(f"link to {target}: no heading #{anchor} in {dest.name}")
    return found


def rel(path):
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_documented_command_runs_as_written(doc):
    found = [f"{rel(doc)}:{line}: {p}" for line, argv in commands(doc.read_text()) for p in problems(argv)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_named_file_and_link_exists(doc):
    scripts = {p.name for folder in (ROOT, ROOT / "bench", ROOT / "tests") for p in folder.glob("*.py")}
    found = [f"{rel(doc)}: names {p}, which is not in the repository" for p in sorted(named_paths(doc.read_text()))
             if not (ROOT / p).exists() and not (doc.parent / p).exists() and p not in scripts]
    found += [f"{rel(doc)}: {p}" for p in broken_links(doc)]
    assert not found, "\n".join(found)


def test_the_docs_have_commands_to_check():
    """The checker sees the commands (a parser that found none would pass everything)."""
    seen = {script_call(argv)[0] for doc in DOCS for _, argv in commands(doc.read_text()) if script_call(argv)}
    assert {"train.py", "finetune.py", "evaluate.py", "prepare_owt.py", "prepare_finetune.py", "pipeline.py",
            "report.py", "sample.py"} <= seen


def test_an_invented_flag_fails():
    doc = """
Some prose naming `bench/no_such_bench.py`.

Inline: `python report.py out/cpu
--no-such-option`.

```bash
python train.py config/pretrain_cpu.py --n_layer=6 --no_such_key=1   # a comment --not_a_flag
torchrun --standalone --nproc_per_node=8 evaluate.py --task all --limt 5 \\
    --num-beams 4
python finetune.py config/finetune_nope.py && python missing_script.py --x
python pipeline.py --preset cpu -- --eval_limit=200 --not_a_pipeline_key=1
```
"""
    found = [p for _, argv in commands(doc) for p in problems(argv)]
    assert found == ["train.py does not accept --no_such_key", "evaluate.py does not accept --limt",
                     "config/finetune_nope.py does not exist", "missing_script.py does not exist",
                     "pipeline.py does not accept --not_a_pipeline_key", "report.py does not accept --no-such-option"]
    assert named_paths(doc) == {"bench/no_such_bench.py"}
