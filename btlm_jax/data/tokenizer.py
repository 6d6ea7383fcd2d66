"""Tokenizers: sentencepiece (trained here or loaded), Hugging Face ``tokenizer.json``, bytes.

:func:`load_or_train` is what the training loop calls:

* ``data.tokenizer`` set to a ``.model`` file: load that sentencepiece model;
* set to a ``tokenizer.json``: load it with Hugging Face ``tokenizers`` (optional dependency;
  BTLM checkpoints use GPT-2's 50,257-token BPE);
* set to a directory: its ``tokenizer.json``, else GPT-2 style ``vocab.json`` + ``merges.txt``
  (byte-level BPE, as cerebras/btlm-3b-8k-base ships it), else its one sentencepiece ``*.model``
  (else ``bytes.tokenizer``, the marker :func:`copy_tokenizer_files` writes for ``bytes``);
* set to ``bytes``: a byte-level tokenizer (256 byte ids + EOS), handy for tests and debugging;
* empty: train a sentencepiece model (``data.tokenizer_type`` bpe or unigram, vocabulary
  ``model.vocab_size``, byte fallback so no text is ever unknown) on a sample of the training
  data. The model is cached in the cache directory under a key made from the sample's contents
  and the settings, so it is trained once per corpus and setting.

A :class:`Tokenizer` pickles as its serialized model, so it can be sent to Grain worker processes,
where tokenization happens (batched, :meth:`Tokenizer.encode_batch`). It keeps the bytes of the
files it was loaded from, so :func:`copy_tokenizer_files` can pin a run's tokenizer into
``RUN/tokenizer/`` (and export write it next to the weights) in its original form.
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

    def __init__(self, kind: str, blob: bytes = b"", name: str = "",
                 files: dict[str, bytes] | None = None):
        if kind not in ("sentencepiece", "hf", "bytes"):
            raise TokenizerError(f"unknown tokenizer kind {kind!r}")
        self.kind, self._blob, self.name = kind, blob, name
        if files is None:
            files = {"sentencepiece": {"tokenizer.model": blob}, "hf": {"tokenizer.json": blob},
                     "bytes": {BYTES_MARKER: _BYTES_MARKER_TEXT}}[kind]
        self.files = dict(files)  # {file name: contents}: what copy_tokenizer_files writes
        self._impl = None
        self._load()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """A tokenizer file (``tokenizer.json``, sentencepiece ``.model``), a directory (see
        :func:`load_tokenizer`) or the word ``bytes``."""
        return load_tokenizer(path)

    @classmethod
    def from_gpt2_files(cls, vocab: str | os.PathLike, merges: str | os.PathLike,
                        extra: dict[str, bytes] | None = None) -> "Tokenizer":
        """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt`` (the layout of GPT-2,
        Cerebras-GPT and cerebras/btlm-3b-8k-base), built with the ``tokenizers`` library as
        GPT-2's fast tokenizer is: byte-level pre-tokenization with GPT-2's split regex, no
        prefix space, ``<|endoftext|>`` a special token."""
        tokenizers = _import_tokenizers(f"{vocab} + {merges}")
        from tokenizers import decoders, models, pre_tokenizers, processors

        name = f"{vocab} + {merges}"
        files = {"vocab.json": Path(vocab).read_bytes(), "merges.txt": Path(merges).read_bytes()}
        try:
            vocab_map = json.loads(files["vocab.json"].decode("utf-8"))
            bpe = models.BPE.from_file(os.fspath(vocab), os.fspath(merges))
        except Exception as e:
            raise TokenizerError(f"{name}: not GPT-2 style vocab.json + merges.txt ({e})") from None
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.decoder = decoders.ByteLevel()
        specials = [t for t in ("<|endoftext|>",) if t in vocab_map]
        if specials:
            tok.add_special_tokens(specials)  # already in the vocabulary: ids unchanged
        files.update(extra or {})
        return cls("hf", tok.to_str().encode("utf-8"), name, files)

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
        tokenizers = _import_tokenizers(self.name)
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
        return {"kind": self.kind, "blob": self._blob, "name": self.name, "files": self.files}

    def __setstate__(self, state):
        self.kind, self._blob, self.name = state["kind"], state["blob"], state["name"]
        self.files = state.get("files") or {}
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
        """Writes the serialized model (a ``tokenizer.json`` or sentencepiece ``.model``) to
        one file; :func:`copy_tokenizer_files` writes the original files into a directory."""
        if self.kind == "bytes":
            raise TokenizerError("the bytes tokenizer has no file form; use data.tokenizer=bytes")
        Path(path).write_bytes(self._blob)


# ----------------------------------------------------------------------------------------------
# Loading from files and directories; pinning a tokenizer's files into a directory.

BYTES_MARKER = "bytes.tokenizer"  # the file that stands for the bytes tokenizer in a directory
_BYTES_MARKER_TEXT = b"btlm_jax bytes tokenizer: ids 0-255 are the UTF-8 bytes, 256 is EOS\n"
# Hugging Face side files copied along with a directory's tokenizer (special tokens, settings).
_HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", BYTES_MARKER) + _HF_SIDE_FILES


def _import_tokenizers(what):
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(
            f"tokenizer {what}: Hugging Face tokenizer files need the `tokenizers` library: "
            "pip install 'btlm_jax[hf]' (or pip install tokenizers)") from None
    return tokenizers


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a file, a directory, or the word ``bytes``.

    A file: ``*.json`` is a Hugging Face ``tokenizer.json``, anything else a sentencepiece model
    (``vocab.json`` or ``merges.txt`` given alone use their sibling). A directory, in this order:
    ``tokenizer.json``; ``vocab.json`` + ``merges.txt`` (GPT-2 byte-level BPE); exactly one
    sentencepiece ``*.model``; ``bytes.tokenizer``. Hugging Face side files
    (``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``) next to it are
    kept with the tokenizer so they are copied along. Errors name the path.
    """
    path = os.fspath(path)
    if path == "bytes":
        return Tokenizer("bytes", name="bytes")
    p = Path(path)
    if p.is_file() and p.name in ("vocab.json", "merges.txt"):
        p = p.parent
    if p.is_dir():
        side = {n: (p / n).read_bytes() for n in _HF_SIDE_FILES if (p / n).is_file()}
        if (p / "tokenizer.json").is_file():
            blob = (p / "tokenizer.json").read_bytes()
            return Tokenizer("hf", blob, str(p / "tokenizer.json"),
                             {"tokenizer.json": blob, **side})
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return Tokenizer.from_gpt2_files(p / "vocab.json", p / "merges.txt", side)
        models = sorted(q for q in p.glob("*.model") if q.is_file())
        if len(models) == 1:
            blob = models[0].read_bytes()
            return Tokenizer("sentencepiece", blob, str(models[0]), {models[0].name: blob})
        if len(models) > 1:
            raise TokenizerError(
                f"tokenizer directory {path!r} holds several sentencepiece models "
                f"({', '.join(q.name for q in models)}): give the file itself")
        if (p / BYTES_MARKER).is_file():
            return Tokenizer("bytes", name="bytes")
        hint = " (it has vocab.json but no merges.txt)" if (p / "vocab.json").is_file() else ""
        raise TokenizerError(
            f"tokenizer directory {path!r} holds no tokenizer.json, vocab.json + merges.txt or "
            f"sentencepiece .model{hint}: give a tokenizer file or a directory holding one")
    if not p.is_file():
        raise TokenizerError(f"data.tokenizer={path!r}: no such file or directory")
    blob = p.read_bytes()
    if p.suffix == ".json":
        return Tokenizer("hf", blob, path, {"tokenizer.json": blob})
    return Tokenizer("sentencepiece", blob, path, {p.name if p.suffix == ".model"
                                                   else "tokenizer.model": blob})


def copy_tokenizer_files(tokenizer_or_path, dst_dir: str | os.PathLike) -> Path:
    """Writes a tokenizer's files (as it was loaded: ``tokenizer.json``, or ``vocab.json`` +
    ``merges.txt``, or the sentencepiece ``.model``, plus Hugging Face side files) into
    ``dst_dir`` (created), so that ``load_tokenizer(dst_dir)`` gives the same tokenizer.

    ``tokenizer_or_path`` is a :class:`Tokenizer` or anything :func:`load_tokenizer` accepts.
    Other tokenizer files already in ``dst_dir`` are removed so they cannot shadow these.
    Returns ``dst_dir``.
    """
    tok = tokenizer_or_path if isinstance(tokenizer_or_path, Tokenizer) else \
        load_tokenizer(tokenizer_or_path)
    if not tok.files:
        raise TokenizerError(f"{tok!r} has no files to copy")
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for q in list(dst.glob("*.model")) + [dst / n for n in _TOKENIZER_FILES]:
        if q.name not in tok.files and q.is_file():
            q.unlink()
    for name, blob in tok.files.items():
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dst)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, dst / name)
    return dst


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
        tok = load_tokenizer(path)
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
        tok = load_tokenizer(model_path)
    if tok.vocab_size > vocab:
        raise TokenizerError(
            f"data.tokenizer={tok.name!r} has {tok.vocab_size} tokens but model.vocab_size="
            f"{vocab}: set model.vocab_size >= {tok.vocab_size}")
    return tok
