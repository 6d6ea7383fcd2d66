"""Punctuated English prose -> utterances with per-word punctuation labels.

The default source is prose that every CPython installation carries: the ``pydoc_data.topics``
help pages and the docstrings of the standard library (read with :mod:`ast`, nothing is imported).
Any UTF-8 text file can be used instead (``--text``); blank lines separate documents.

An utterance is a run of whole sentences, in order, from one document. Its *spoken* form keeps the
punctuation (so the TTS engine pauses and inflects accordingly); its *ASR* form is lowercase words
without punctuation, and each word carries the label of the punctuation that followed it.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import pathlib
import re
import sysconfig

import numpy as np

CLASSES = ("none", "comma", "period", "question")
PUNCT_TO_CLASS = {",": 1, ".": 2, "?": 3}

_WORD_RE = re.compile(r"^[A-Za-z]+(?:'[A-Za-z]+)?$")
_SENT_SPLIT_RE = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
_ALLOWED_RE = re.compile(r"^[A-Za-z ,.?!;:'\-]+$")


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One utterance: the text given to the TTS engine, its ASR-style words and their labels."""

    spoken: str  # punctuated, cased text, exactly what is synthesised
    words: tuple[str, ...]  # lowercase, punctuation stripped
    labels: tuple[int, ...]  # index into CLASSES: punctuation after each word
    doc: int  # index of the source document

    @property
    def key(self) -> str:
        return hashlib.sha1(self.spoken.encode("utf-8")).hexdigest()[:16]


def stdlib_documents() -> list[str]:
    """English prose shipped with Python: pydoc topic pages and stdlib docstrings (sorted, stable)."""
    docs: list[str] = []
    try:
        from pydoc_data import topics

        docs.extend(topics.topics[k] for k in sorted(topics.topics))
    except ImportError:  # pragma: no cover - some distributions split pydoc_data out
        pass
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "site-packages", "idle_test") for p in rel):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    if not docs:
        raise RuntimeError(
            "found no prose in this Python installation (pydoc_data and stdlib sources missing); "
            "pass a text file with --text"
        )
    return docs


def file_documents(path: str | pathlib.Path) -> list[str]:
    """Documents of a UTF-8 text file, separated by blank lines."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--text file {str(p)!r} does not exist; give a UTF-8 text file")
    text = p.read_text(encoding="utf-8", errors="replace")
    docs = [d for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not docs:
        raise ValueError(f"--text file {str(p)!r} is empty")
    return docs


def _paragraphs(doc: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.split("\n")
        # Skip code, tables and doctest blocks: any line indented by 4+ spaces or starting with >>>.
        if any(line.startswith(("    ", "\t", ">>>", "...")) for line in lines):
            continue
        out.append(" ".join(line.strip() for line in lines))
    return out


def clean_sentence(sent: str, max_words: int) -> str | None:
    """Return the sentence in a TTS- and label-friendly form, or None if it is not plain prose."""
    s = " ".join(sent.split())
    s = re.sub(r"(?<=[A-Za-z])-(?=[A-Za-z])", " ", s)  # built-in -> built in
    if not s or not s[0].isupper() or not _ALLOWED_RE.match(s):
        return None
    if s[-1] not in ".?!":
        return None
    s = s[:-1] + ("?" if s[-1] == "?" else ".")
    s = s.replace(";", ",").replace(":", ",")
    body = s[:-1]
    if any(ch in body for ch in ".?!"):
        return None  # abbreviations (e.g., i.e.) and mid-sentence stops
    if ",," in s.replace(" ", "") or body.rstrip().endswith(","):
        return None
    words = s.split()
    if not 3 <= len(words) <= max_words:
        return None
    for w in words:
        if not _WORD_RE.match(w.rstrip(",.?")) or w.startswith(("'", ",")):
            return None
    return s


def sentences_of(doc: str, max_words: int) -> list[str]:
    """Clean sentences of a document, in order (code blocks and non-prose sentences skipped)."""
    out = []
    for para in _paragraphs(doc):
        out.extend(c for c in (clean_sentence(s, max_words) for s in _SENT_SPLIT_RE.split(para)) if c)
    return out


def words_and_labels(spoken: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    words, labels = [], []
    for tok in spoken.split():
        label = PUNCT_TO_CLASS.get(tok[-1], 0)
        words.append(tok.rstrip(",.?").lower())
        labels.append(label)
    return tuple(words), tuple(labels)


def make_utterances(
    docs: list[str], *, min_words: int, max_words: int, seed: int
) -> list[Utterance]:
    """Group consecutive clean sentences into utterances of about min_words..max_words words.

    The target length of each utterance is drawn uniformly from [min_words, max_words]; sentences
    are added while the total stays within max_words. Deterministic given (docs, seed).
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    rng = np.random.default_rng(seed)
    out: list[Utterance] = []
    for d, doc in enumerate(docs):
        run = sentences_of(doc, max_words)
        if run:
            i = 0
            while i < len(run):
                target = int(rng.integers(min_words, max_words + 1))
                group = [run[i]]
                n = len(run[i].split())
                i += 1
                while i < len(run) and n < target and n + len(run[i].split()) <= max_words:
                    group.append(run[i])
                    n += len(run[i].split())
                    i += 1
                spoken = " ".join(group)
                words, labels = words_and_labels(spoken)
                out.append(Utterance(spoken, words, labels, d))
    return out


def split_by_document(
    utts: list[Utterance], test_fraction: float, seed: int
) -> tuple[list[Utterance], list[Utterance]]:
    """Disjoint train/test: whole documents go to one side (stable hash of doc index and seed);
    test utterances that share a sentence with any training utterance are dropped."""

    def is_test(doc: int) -> bool:
        h = hashlib.sha1(f"{seed}:{doc}".encode()).digest()
        return int.from_bytes(h[:8], "little") / 2**64 < test_fraction

    seen: set[str] = set()
    uniq = []
    for u in utts:  # exact duplicate utterances (docstrings repeat) are kept once
        if u.spoken not in seen:
            seen.add(u.spoken)
            uniq.append(u)
    train = [u for u in uniq if not is_test(u.doc)]
    train_sents = {s for u in train for s in _SENT_SPLIT_RE.split(u.spoken)}
    test = [
        u
        for u in uniq
        if is_test(u.doc) and not any(s in train_sents for s in _SENT_SPLIT_RE.split(u.spoken))
    ]
    return train, test
