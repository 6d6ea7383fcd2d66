"""Tokenizers: sentencepiece (trained here or loaded), Hugging Face ``tokenizer.json``, bytes.

:func:`load_or_train` is what the training loop calls:

* ``data.tokenizer`` set to a ``.model`` file: load that sentencepiece model;
* set to a ``tokenizer.json``: load it with Hugging Face ``tokenizers`` (optional dependency;
  BTLM checkpoints use GPT-2's 50,257-token BPE);
* set to ``bytes``: a byte-level tokenizer (256 byte ids + EOS), handy for tests and debugging;
* empty: train a sentencepiece model (``data.tokenizer_type`` bpe or unigram, vocabulary
  ``model.vocab_size``, byte fallback so no text is ever unknown) on a sample of the training
  data. The model is cached in the cache directory under a key made from the sample's contents
  and the settings, so it is trained once per corpus and setting.

A :class:`Tokenizer` pickles as its serialized model, so it can be sent to Grain worker processes,
where tokenization happens (batched, :meth:`Tokenizer.encode_batch`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from btlm_jax.data.slimpajama import cfg_get

TRAIN_SAMPLE_BYTES = 3_000_000  # text sampled from the training data to train a tokenizer on
_TRAIN_VERSION = 1


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or does not fit the model. The message names the culprit."""


class Tokenizer:
    """A uniform interface over sentencepiece, HF ``tokenizers`` and raw bytes.

    Attributes: ``kind`` ("sentencepiece" | "hf" | "bytes"), ``vocab_size``, ``eos_id``,
    ``name`` (the file it came from, or a description).
    """

    def __init__(self, kind: str, blob: bytes = b"", name: str = ""):
        if kind not in ("sentencepiece", "hf", "bytes"):
            raise TokenizerError(f"unknown tokenizer kind {kind!r}")
        self.kind, self._blob, self.name = kind, blob, name
        self._impl = None
        self._load()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.fspath(path)
        if path == "bytes":
            return cls("bytes", name="bytes")
        if not os.path.isfile(path):
            raise TokenizerError(f"data.tokenizer={path!r}: no such file")
        blob = Path(path).read_bytes()
        if path.endswith(".json"):
            return cls("hf", blob, path)
        return cls("sentencepiece", blob, path)

    def _load(self):
        if self.kind == "bytes":
            self.vocab_size, self.eos_id = 257, 256
            return
        if self.kind == "sentencepiece":
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor()
            try:
                sp.LoadFromSerializedProto(self._blob)
            except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
                raise TokenizerError(
                    f"data.tokenizer={self.name!r}: not a sentencepiece model ({e})") from None
            self._impl = sp
            self.vocab_size = sp.get_piece_size()
            self.eos_id = sp.eos_id()
            if self.eos_id < 0:
                raise TokenizerError(f"data.tokenizer={self.name!r}: the model has no EOS piece")
            return
        try:
            import tokenizers
        except ImportError:
            raise TokenizerError(
                f"data.tokenizer={self.name!r} is a Hugging Face tokenizer.json: install the "
                "optional dependency with `pip install tokenizers`") from None
        try:
            tok = tokenizers.Tokenizer.from_str(self._blob.decode("utf-8"))
        except Exception as e:
            raise TokenizerError(f"data.tokenizer={self.name!r}: not a tokenizer.json ({e})") from None
        self._impl = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eos = None
        for piece in ("<|endoftext|>", "</s>", "<eos>", "[SEP]"):
            eos = tok.token_to_id(piece)
            if eos is not None:
                break
        if eos is None:
            raise TokenizerError(
                f"data.tokenizer={self.name!r}: found no end-of-text token (<|endoftext|>, </s>)")
        self.eos_id = int(eos)

    def __getstate__(self):
        return {"kind": self.kind, "blob": self._blob, "name": self.name}

    def __setstate__(self, state):
        self.kind, self._blob, self.name = state["kind"], state["blob"], state["name"]
        self._impl = None
        self._load()

    def __repr__(self):
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, name={self.name!r})"

    # -- use ----------------------------------------------------------------------------------

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS added)."""
        texts = list(texts)
        if self.kind == "bytes":
            return [list(t.encode("utf-8")) for t in texts]
        if self.kind == "sentencepiece":
            return self._impl.encode(texts, out_type=int, num_threads=1)
        return [e.ids for e in self._impl.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self.kind == "bytes":
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        if self.kind == "sentencepiece":
            return self._impl.decode(ids)
        return self._impl.decode(ids, skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        if self.kind == "bytes":
            raise TokenizerError("the bytes tokenizer has no file form; use data.tokenizer=bytes")
        Path(path).write_bytes(self._blob)


# ----------------------------------------------------------------------------------------------
# Training.


def _sample_texts(train_glob: str, cache_dir: str, source_field: str, on_error: str,
                  budget: int = TRAIN_SAMPLE_BYTES, seed: int = 0) -> list[str]:
    """A deterministic sample of documents (about ``budget`` bytes) drawn across all sources."""
    from btlm_jax.data import slimpajama

    corpus = slimpajama.Corpus(train_glob, cache_dir=cache_dir, source_field=source_field,
                               on_error=on_error)
    order = np.random.default_rng(seed).permutation(len(corpus))
    # Give every source a share of the budget so small sources are represented.
    per_source = budget // max(len(corpus.source_names), 1)
    used = np.zeros(len(corpus.source_names), np.int64)
    texts = []
    for i in order:
        s = corpus.doc_source[i]
        if used[s] >= per_source:
            continue
        t = corpus.text(int(i))
        texts.append(t[: per_source - used[s] + 1000])
        used[s] += len(texts[-1])
        if used.sum() >= budget:
            break
    return texts


def train_sentencepiece(texts: Sequence[str], vocab_size: int, model_type: str = "bpe",
                        num_threads: int = 2) -> bytes:
    """Trains a sentencepiece model with byte fallback; returns the serialized model."""
    import sentencepiece as spm

    lines = [ln for t in texts for ln in t.splitlines() if ln.strip()]
    if not lines:
        raise TokenizerError("cannot train a tokenizer: the training data has no text")
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=out,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            hard_vocab_limit=False,  # small corpora: fewer pieces is fine, never more
            max_sentence_length=16384,
            split_digits=True,
            allow_whitespace_only_pieces=True,  # code indentation
            remove_extra_whitespaces=False,  # keep code layout
            normalization_rule_name="identity",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerError(f"sentencepiece training failed: {e}") from None
    return out.getvalue()


_cfg_get = cfg_get


def load_or_train(cfg, train_glob: str | None = None) -> Tokenizer:
    """Loads ``cfg.data.tokenizer`` or trains (and caches) a sentencepiece model.

    ``train_glob`` is the training data to sample (defaults to ``cfg.data.train`` or the sample
    corpus). Raises TokenizerError if the tokenizer's vocabulary exceeds ``model.vocab_size``.
    """
    from btlm_jax.data import sample

    vocab = int(_cfg_get(cfg, "model.vocab_size", 8192))
    path = _cfg_get(cfg, "data.tokenizer", "") or ""
    cache_dir = str(sample.default_cache_dir(_cfg_get(cfg, "data.cache_dir", "") or None))
    if path:
        tok = Tokenizer.from_file(path)
    else:
        if not train_glob:
            train_glob = _cfg_get(cfg, "data.train", "") or \
                sample.build_sample_corpus(cache_dir)["train"]
        model_type = _cfg_get(cfg, "data.tokenizer_type", "bpe")
        if model_type not in ("bpe", "unigram"):
            raise TokenizerError(f"data.tokenizer_type={model_type!r}: must be bpe or unigram")
        texts = _sample_texts(train_glob, cache_dir, _cfg_get(cfg, "data.source_field",
                                                               "meta.redpajama_set_name"),
                              _cfg_get(cfg, "data.on_error", "raise"))
        h = hashlib.sha1(json.dumps([_TRAIN_VERSION, model_type, vocab]).encode())
        for t in texts:
            h.update(t.encode("utf-8", errors="surrogatepass"))
            h.update(b"\0")
        model_path = Path(cache_dir) / "tokenizers" / f"sp-{model_type}-{vocab}-{h.hexdigest()[:16]}.model"
        if not model_path.exists():
            blob = train_sentencepiece(texts, vocab, model_type)
            model_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=model_path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, model_path)
        tok = Tokenizer.from_file(model_path)
    if tok.vocab_size > vocab:
        raise TokenizerError(
            f"data.tokenizer={tok.name!r} has {tok.vocab_size} tokens but model.vocab_size="
            f"{vocab}: set model.vocab_size >= {tok.vocab_size}")
    return tok
