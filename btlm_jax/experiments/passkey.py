"""Passkey retrieval, generated in code: a random key (digits spelled as words, so any English
tokenizer has them) hidden in repetitive filler text and asked for at the end.

- :func:`training_text` makes the training documents (mixed into the training data at the
  training length: the experiment writes them as a ``.jsonl`` source of its own);
- :func:`example_ids` builds one evaluation sequence of exactly ``length`` tokens with the key at
  a given token position (e.g. more than ``L_train`` tokens before the question) and returns where
  the key and the answer are; every piece is tokenized as it appears inside a document
  (:func:`in_context`), so the sequence is the tokenizer's own tokenization of its text;
- :func:`accuracy` scores a model: an example is retrieved when the argmax prediction at every
  answer token is that token (teacher forcing; chance is about 10**-digits).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")
QUESTION = " What is the pass key? The pass key is"


def random_key(rng: np.random.Generator, n_digits: int = 4) -> str:
    return " ".join(DIGITS[int(d)] for d in rng.integers(0, 10, n_digits))


def needle(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key."


def answer(key: str) -> str:
    return f" {key}."


def training_text(rng: np.random.Generator, n_chars: int, n_digits: int = 4) -> str:
    """A training document of about ``n_chars`` characters: filler, the needle at a uniformly
    random depth, filler, the question and its answer."""
    key = random_key(rng, n_digits)
    body = max(0, int(n_chars) - len(needle(key)) - len(QUESTION) - len(answer(key)))
    filler = (FILLER * (body // len(FILLER) + 2))[:body]
    cut = int(rng.integers(0, body + 1))
    # cut at a word boundary
    cut = filler.rfind(" ", 0, cut) + 1 if cut else 0
    return filler[:cut] + needle(key) + " " + filler[cut:].lstrip() + QUESTION + answer(key)


def in_context(encode: Callable[[str], Sequence[int]], text: str) -> list[int]:
    """The tokens of ``text`` (which starts with a space) as they come out when it follows filler
    text, i.e. as in a training document. Encoding it alone can differ: a SentencePiece model
    turns a leading space into a piece of its own (``' '`` then ``'e'`` instead of ``' e'``), so
    answer tokens encoded alone are ones the model never saw after the question."""
    ctx = FILLER.strip()
    pre, full = list(encode(ctx)), list(encode(ctx + text))
    if full[:len(pre)] != pre:
        raise ValueError(f"the tokenizer merges {text[:20]!r} with the text before it")
    return full[len(pre):]


def example_ids(encode: Callable[[str], Sequence[int]], rng: np.random.Generator, length: int,
                needle_pos: int | None = None, beyond: int = 0, n_digits: int = 4) -> dict:
    """One evaluation sequence of exactly ``length`` token ids: filler tokens, the needle starting
    at token ``needle_pos``, filler, the question, the answer (the sequence's last tokens).
    ``needle_pos=None``: a uniformly random position such that more than ``beyond`` tokens
    separate the needle's end from the answer's start (e.g. ``beyond = L_train``: the key lies
    beyond the training length from where it is asked for).
    Returns ``{"ids", "needle": (start, end), "answer": (start, end), "key"}`` (token spans)."""
    key = random_key(rng, n_digits)
    nd = in_context(encode, needle(key))
    q = in_context(encode, QUESTION)
    qa = in_context(encode, QUESTION + answer(key))
    if qa[:len(q)] != q:
        raise ValueError(f"the tokenizer merges the question with the answer {answer(key)!r}")
    a = qa[len(q):]
    fill = in_context(encode, " " + FILLER.strip())
    room = length - len(nd) - len(q) - len(a)
    if needle_pos is None:
        # answer start - needle end = (length - len(a)) - (pos + len(nd)) > beyond
        hi = min(room, length - len(a) - len(nd) - int(beyond) - 1)
        if hi < 0:
            raise ValueError(f"length {length} leaves no room for the needle {beyond} tokens "
                             "before the answer")
        needle_pos = int(rng.integers(0, hi + 1))
    if needle_pos < 0 or needle_pos > room:
        raise ValueError(f"needle position {needle_pos}: must lie in [0, {room}] for length "
                         f"{length} (needle {len(nd)}, question {len(q)}, answer {len(a)} tokens)")
    stream = fill * (room // max(1, len(fill)) + 2)
    before, after = stream[:needle_pos], stream[needle_pos:room]
    ids = before + nd + after + q + a
    a0 = length - len(a)
    return {"ids": np.asarray(ids, np.int32), "needle": (needle_pos, needle_pos + len(nd)),
            "answer": (a0, length), "key": key}


def accuracy(logits_fn: Callable[[np.ndarray, float], np.ndarray], examples: Sequence[dict],
             scale: float, batch: int = 8) -> float:
    """Fraction of ``examples`` whose every answer token is the argmax prediction (teacher
    forcing) of ``logits_fn(ids [B, L], alibi_scale) -> [B, L, V]``."""
    hits = 0
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        ids = np.stack([e["ids"] for e in chunk])
        pred = np.asarray(logits_fn(ids, scale)).argmax(-1)
        for row, e in zip(pred, chunk):
            a0, a1 = e["answer"]
            hits += bool(np.all(row[a0 - 1:a1 - 1] == e["ids"][a0:a1]))
    return hits / max(1, len(examples))
