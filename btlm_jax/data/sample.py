"""The embedded default corpus: a small multi-source corpus in SlimPajama's format.

The package cannot ship third-party text, so we build one on the user's machine from text every
Python installation carries:

* ``PythonStdlibCode``: source files of the standard library (a code source, like GitHub),
* ``PydocTopics``: the documentation topics of ``pydoc_data`` (reference prose),
* ``PythonDocstrings``: module, class and function docstrings of the standard library, one
  document per module (prose about code, like StackExchange).

The corpus is written exactly like SlimPajama: ``train/chunk1/example_train_K.jsonl.zst`` and
``validation/chunk1/example_holdout_K.jsonl.zst``, one ``{"text", "meta": {"redpajama_set_name"}}``
object per line. The held-out split is by origin: everything derived from one standard-library
file (its source and its docstrings) is on the same side, chosen by a hash of the file's path
(pydoc topics by their name), so no held-out text sits inside a training document. It is
deterministic for a given Python installation, built once into the cache directory (a few MB, a
few seconds) and rebuilt only when missing. The build writes into a
temporary sibling directory and renames it into place, so an interrupted build is never used.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from btlm_jax.data import slimpajama

SAMPLE_VERSION = 2  # 2: held out by file (source and docstrings of one module on one side)
SOURCES = ("PythonStdlibCode", "PydocTopics", "PythonDocstrings")

# Byte budgets per source (uncompressed text). Small enough to build in seconds on 2 cores.
_CODE_BUDGET = 3_000_000
_DOCSTRING_BUDGET = 1_200_000
_MAX_CODE_FILE = 60_000
_MIN_DOC_CHARS = 200
_HOLDOUT_EVERY = 20  # ~5% of the files / topics (by a hash of the file's path) are held out
_DOCS_PER_SHARD = 400


def default_cache_dir(cache_dir: str | None = None) -> Path:
    """``cache_dir`` if given (and non-empty), else ``$BTLM_JAX_CACHE`` or ``~/.cache/btlm_jax``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("BTLM_JAX_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/btlm_jax").expanduser()


def _h(name: str) -> int:
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "little")


def _stdlib_files() -> list[tuple[str, Path]]:
    """(relative name, path) of the stdlib's .py files, tests and third-party packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
            "lib2to3", "turtledemo", "ensurepip", "venv"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                p = Path(dirpath) / fn
                out.append((p.relative_to(root).as_posix(), p))
    return out


def _read(p: Path) -> str | None:
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _code_docs(files: list[tuple[str, Path]]) -> list[tuple[str, str]]:
    docs, total = [], 0
    for rel, p in sorted(files, key=lambda f: _h("code:" + f[0])):
        text = _read(p)
        if text is None or not (_MIN_DOC_CHARS <= len(text) <= _MAX_CODE_FILE):
            continue
        docs.append((rel, f"# {rel}\n{text}"))
        total += len(text)
        if total >= _CODE_BUDGET:
            break
    return docs


def _topic_docs() -> list[tuple[str, str]]:
    from pydoc_data import topics  # part of every CPython installation

    return [(k, f"{k}\n{'=' * len(k)}\n\n{v.strip()}\n") for k, v in sorted(topics.topics.items())
            if len(v) >= _MIN_DOC_CHARS]


def _module_docstrings(rel: str, text: str) -> str | None:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    mod = rel[:-3].replace("/", ".").removesuffix(".__init__")
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {mod}\n\n{doc.strip()}")

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                d = ast.get_docstring(child)
                if d and not child.name.startswith("_"):
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    parts.append(f"{kind} {mod}.{name}\n\n{d.strip()}")
                if isinstance(child, ast.ClassDef):
                    visit(child, name + ".")

    visit(tree, "")
    body = "\n\n".join(parts)
    return body if len(body) >= _MIN_DOC_CHARS else None


def _docstring_docs(files: list[tuple[str, Path]]) -> list[tuple[str, str]]:
    docs, total = [], 0
    for rel, p in sorted(files, key=lambda f: _h("doc:" + f[0])):
        text = _read(p)
        if text is None or len(text) > 400_000:
            continue
        body = _module_docstrings(rel, text)
        if body is None:
            continue
        docs.append((rel, body))
        total += len(body)
        if total >= _DOCSTRING_BUDGET:
            break
    return docs


def _collect() -> dict[str, list[tuple[str, str]]]:
    files = _stdlib_files()
    return {
        "PythonStdlibCode": _code_docs(files),
        "PydocTopics": _topic_docs(),
        "PythonDocstrings": _docstring_docs(files),
    }


def corpus_dir(cache_dir: str | None = None) -> Path:
    """Where the sample corpus for this Python installation lives (built or not)."""
    tag = f"v{SAMPLE_VERSION}-py{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}"
    return default_cache_dir(cache_dir) / "sample_corpus" / tag


def held_out(source: str, name: str) -> bool:
    """Whether the document ``name`` of ``source`` is in the held-out split: by origin, so the
    code and the docstrings of one file (both named by its path) are on the same side."""
    origin = f"topic:{name}" if source == "PydocTopics" else f"file:{name}"
    return _h(f"split:{origin}") % _HOLDOUT_EVERY == 0


def _write(out: Path, docs_by_source: dict[str, list[tuple[str, str]]]) -> None:
    train, hold = [], []
    for source in SOURCES:
        for name, text in docs_by_source[source]:
            rec = {"text": text, "meta": {"redpajama_set_name": source}}
            (hold if held_out(source, name) else train).append(
                (_h(f"order:{source}:{name}"), rec))
    # Interleave sources across shards like SlimPajama does (documents are shuffled).
    for split, recs, prefix in (("train", train, "example_train"),
                                ("validation", hold, "example_holdout")):
        recs = [r for _, r in sorted(recs, key=lambda x: x[0])]
        for k in range(0, max(len(recs), 1), _DOCS_PER_SHARD):
            path = out / split / "chunk1" / f"{prefix}_{k // _DOCS_PER_SHARD}.jsonl.zst"
            slimpajama.write_jsonl_zst(path, recs[k:k + _DOCS_PER_SHARD])


def build_sample_corpus(cache_dir: str | None = None) -> dict[str, str]:
    """Builds (once) the embedded corpus and returns ``{"train": glob, "eval": glob}``.

    ``cache_dir`` defaults to ``~/.cache/btlm_jax`` (config ``data.cache_dir`` overrides).
    """
    final = corpus_dir(cache_dir)
    globs = {"train": str(final / "train" / "chunk*" / "*.jsonl.zst"),
             "eval": str(final / "validation" / "chunk*" / "*.jsonl.zst")}
    if (final / "COMPLETE").exists():
        return globs
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
    try:
        docs = _collect()
        for source in SOURCES:
            if not docs[source]:
                raise RuntimeError(
                    f"sample corpus: found no text for source {source} in this Python "
                    f"installation ({sysconfig.get_paths()['stdlib']}); set data.train instead")
        _write(tmp, docs)
        counts = {s: len(d) for s, d in docs.items()}
        (tmp / "COMPLETE").write_text(f"{counts}\n")
        try:
            os.rename(tmp, final)
        except OSError:
            # Someone else finished first (or a stale incomplete dir is in the way).
            if not (final / "COMPLETE").exists():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return globs
