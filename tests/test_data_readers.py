"""Readers, offset index, bad input, sample corpus, tokenizer (btlm_jax.data)."""

import json
import os
import random
import re

import numpy as np
import pytest
import zstandard

from btlm_jax.config import default_config
from btlm_jax.data import sample, slimpajama, tokenizer
from btlm_jax.data.slimpajama import Corpus, DataError


def _rand_text(rng, n):
    alphabet = "abcdefghij klmnop\nqrs\ttuv wxyz ÄÖü 中文 \"quote\" \\ {json}"
    return "".join(rng.choice(alphabet) for _ in range(n))


def _write_multiframe_zst(path, lines):
    """Two independent zstd frames, concatenated (valid .zst, like some real shards)."""
    payload = "".join(line + "\n" for line in lines).encode()
    half = len(payload) // 2
    cut = payload.index(b"\n", half) + 1
    c = zstandard.ZstdCompressor()
    path.write_bytes(c.compress(payload[:cut]) + c.compress(payload[cut:]))


def _make_corpus(tmp_path, seed=0):
    rng = random.Random(seed)
    recs_a = [{"text": _rand_text(rng, rng.randint(1, 3000)),
               "meta": {"redpajama_set_name": rng.choice(["RedPajamaC4", "RedPajamaGithub"])}}
              for _ in range(120)]
    recs_b = [{"text": _rand_text(rng, rng.randint(1, 500)), "id": i} for i in range(30)]
    d = tmp_path / "data" / "train" / "chunk1"
    d.mkdir(parents=True)
    _write_multiframe_zst(d / "example_train_0.jsonl.zst", [json.dumps(r) for r in recs_a])
    (d / "extra.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs_b),
                                   encoding="utf-8")
    (d / "book.txt").write_text("A whole book.\n\nWith paragraphs.\n", encoding="utf-8")
    return d


def _full_decode(d):
    """Independent reference: decompress/parse every file completely, in sorted path order."""
    out = []
    for name in sorted(os.listdir(d)):
        p = d / name
        if name.endswith(".zst"):
            with open(p, "rb") as f:
                data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
            out += [(json.loads(l)["meta"]["redpajama_set_name"], json.loads(l)["text"])
                    for l in data.decode().splitlines() if l.strip()]
        elif name.endswith(".jsonl"):
            out += [("default", json.loads(l)["text"])
                    for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]
        elif name.endswith(".txt"):
            out.append(("default", p.read_text(encoding="utf-8")))
    return out


def test_offset_index_matches_full_decode(tmp_path, monkeypatch):
    monkeypatch.setattr(slimpajama, "BLOCK_BYTES", 4096)  # many frames in the seekable copy
    d = _make_corpus(tmp_path)
    ref = _full_decode(d)
    corpus = Corpus(str(d / "*"), cache_dir=tmp_path / "cache")
    assert len(corpus) == len(ref)
    assert len(corpus.block_offsets[corpus.paths.index(str(d / "example_train_0.jsonl.zst"))]) > 5
    order = list(range(len(ref)))
    random.Random(1).shuffle(order)  # random access, not sequential
    for i in order:
        assert corpus.text(i) == ref[i][1]
        assert corpus.source_names[corpus.doc_source[i]] == ref[i][0]
    # A second Corpus comes from the cached index (no rebuild) and agrees.
    again = Corpus(str(d / "*"), cache_dir=tmp_path / "cache")
    assert [again.text(i) for i in range(len(ref))] == [r[1] for r in ref]
    # Streaming reader agrees too.
    streamed = [t for n in sorted(os.listdir(d)) for _, t in slimpajama.read_documents(str(d / n))]
    assert streamed == [r[1] for r in ref]


def test_label_and_source_field(tmp_path):
    d = _make_corpus(tmp_path)
    c = Corpus(f"code={d}/*.jsonl,{d}/*.zst", cache_dir=tmp_path / "c")
    assert set(c.source_names) == {"code", "RedPajamaC4", "RedPajamaGithub"}
    assert (c.doc_source == c.source_names.index("code")).sum() == 30
    c2 = Corpus(f"{d}/*.zst", cache_dir=tmp_path / "c", source_field="nonexistent.field")
    assert c2.source_names == ["default"]


def test_truncated_zst_names_file_and_skip_counts(tmp_path):
    d = _make_corpus(tmp_path)
    p = d / "example_train_0.jsonl.zst"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(DataError, match="example_train_0.jsonl.zst.*truncated"):
        Corpus(str(p), cache_dir=tmp_path / "c")
    c = Corpus(str(p), cache_dir=tmp_path / "c", on_error="skip")
    assert c.skipped >= 1 and "truncated" in c.errors[-1]
    fresh = _make_corpus(tmp_path / "fresh")
    for name in ("extra.jsonl", "book.txt"):
        (fresh / name).unlink()
    full = [t for _, t in _full_decode(fresh)][:len(c)]
    assert 0 < len(c) < 120
    assert [c.text(i) for i in range(len(c))] == full  # what was kept is intact


def test_corrupt_zst_and_bad_json_line(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    good = json.dumps({"text": "fine"})
    (d / "a.jsonl").write_text(f"{good}\n{{not json\n{good}\n{json.dumps({'no_text': 1})}\n")
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid JSON"):
        Corpus(str(d / "a.jsonl"), cache_dir=tmp_path / "c")
    c = Corpus(str(d / "a.jsonl"), cache_dir=tmp_path / "c", on_error="skip")
    assert len(c) == 2 and c.skipped == 2
    assert any("a.jsonl:4" in e for e in c.errors)
    z = d / "b.jsonl.zst"
    blob = bytearray(zstandard.ZstdCompressor().compress((good + "\n").encode() * 2000))
    for k in range(20, len(blob) - 8, 7):
        blob[k] ^= 0x5A
    z.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"b\.jsonl\.zst"):
        Corpus(str(z), cache_dir=tmp_path / "c")


def test_missing_paths_name_key_and_glob(tmp_path):
    with pytest.raises(DataError, match=r"data\.train=.*nowhere/\*\.jsonl\.zst"):
        Corpus(str(tmp_path / "nowhere/*.jsonl.zst"), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"data\.eval"):
        Corpus(str(tmp_path / "x/*.jsonl"), key="data.eval", cache_dir=tmp_path / "c")


def test_sample_corpus_format_and_caching(tmp_path):
    globs = sample.build_sample_corpus(str(tmp_path))
    root = sample.corpus_dir(str(tmp_path))
    train = sorted((root / "train" / "chunk1").glob("example_train_*.jsonl.zst"))
    hold = sorted((root / "validation" / "chunk1").glob("example_holdout_*.jsonl.zst"))
    assert train and hold
    seen, total = {}, 0
    code = {"train": set(), "hold": set()}  # modules whose source is on each side
    docs = {"train": [], "hold": []}  # the qualified names of each docstrings document
    for p in train + hold:
        side = "hold" if p in hold else "train"
        with open(p, "rb") as f:
            raw = zstandard.ZstdDecompressor().stream_reader(f).read().decode()
        for line in raw.splitlines():
            rec = json.loads(line)
            assert set(rec) == {"text", "meta"} and isinstance(rec["text"], str)
            src = rec["meta"]["redpajama_set_name"]
            seen[src] = seen.get(src, 0) + 1
            total += len(rec["text"])
            if src == "PythonStdlibCode":  # "# path/to/mod.py" first
                rel = rec["text"].split("\n", 1)[0][2:]
                code[side].add(rel[:-3].replace("/", ".").removesuffix(".__init__"))
            elif src == "PythonDocstrings":  # "Module m" heads a module with a docstring
                docs[side].append(re.match(r"Module ([\w.]+)\n", rec["text"]))
    assert set(seen) == set(sample.SOURCES)
    assert 1_000_000 < total < 20_000_000
    # Held out by file: no module's docstrings on one side and its source on the other.
    for side, other in (("hold", "train"), ("train", "hold")):
        found = [m.group(1) for m in docs[side] if m]
        assert len(found) >= 5  # the check has something to check
        leaked = sorted(m for m in found if m in code[other])
        assert not leaked, f"{side} docstrings of modules whose code is in {other}: {leaked}"
    # Cached: a second call does not rewrite; an interrupted build dir is never used.
    mtime = train[0].stat().st_mtime_ns
    (root.parent / ".building-stale").mkdir()
    assert sample.build_sample_corpus(str(tmp_path)) == globs
    assert train[0].stat().st_mtime_ns == mtime
    # Deterministic: a fresh build elsewhere gives identical bytes.
    sample.build_sample_corpus(str(tmp_path / "other"))
    other = sample.corpus_dir(str(tmp_path / "other"))
    for p in train:
        assert (other / p.relative_to(root)).read_bytes() == p.read_bytes()


def _cfg(tmp_path, **data):
    cfg = default_config()
    cfg.data.cache_dir = str(tmp_path / "cache")
    for k, v in data.items():
        cfg.data[k] = v
    return cfg


def test_tokenizer_train_cache_roundtrip_and_vocab_check(tmp_path):
    d = _make_corpus(tmp_path)
    cfg = _cfg(tmp_path, train=str(d / "*"))
    cfg.model.vocab_size = 400
    tok = tokenizer.load_or_train(cfg)
    assert tok.vocab_size <= 400 and tok.eos_id >= 0
    texts = [t for _, t in _full_decode(d)][:20]
    ids = tok.encode_batch(texts)
    assert [tok.decode(x) for x in ids] == texts  # byte fallback: lossless
    assert all(0 <= i < tok.vocab_size for x in ids for i in x)
    models = list((tmp_path / "cache" / "tokenizers").glob("*.model"))
    assert len(models) == 1
    mtime = models[0].stat().st_mtime_ns
    tokenizer.load_or_train(cfg)  # cached: no retrain
    assert models[0].stat().st_mtime_ns == mtime
    # Loading an existing model into a model with a too-small vocabulary is a clear error.
    cfg2 = _cfg(tmp_path, tokenizer=str(models[0]))
    cfg2.model.vocab_size = 300
    with pytest.raises(tokenizer.TokenizerError, match=r"model\.vocab_size=300"):
        tokenizer.load_or_train(cfg2)
    bt = tokenizer.Tokenizer.from_file("bytes")
    assert bt.decode(bt.encode("héllo")) == "héllo" and bt.eos_id == 256


def test_arrayrecord_conversion_reads_the_same_documents_and_batches(tmp_path):
    """`python -m btlm_jax.data.convert_arrayrecord` turns .jsonl.zst shards into ArrayRecord
    files that the same chain reads: the same documents (against a full decode of the shards)
    and the same training batches as the shards themselves."""
    import subprocess
    import sys
    from pathlib import Path

    from btlm_jax.data import pipeline

    rng = random.Random(5)
    root = tmp_path / "sp" / "train"
    recs = [{"text": _rand_text(rng, rng.randint(20, 400)),
             "meta": {"redpajama_set_name": rng.choice(["A", "B"])}} for _ in range(80)]
    for k in range(2):
        slimpajama.write_jsonl_zst(root / f"chunk{k + 1}" / f"example_train_{k}.jsonl.zst",
                                   recs[k::2])
    jsonl = str(root / "chunk*" / "*.jsonl.zst")
    out = tmp_path / "ar"
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "btlm_jax.data.convert_arrayrecord", f"--input={jsonl}",
           f"--output={out}"]
    env = dict(os.environ, PYTHONPATH=str(repo))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    made = sorted(str(p.relative_to(out)) for p in out.rglob("*.array_record"))
    assert made == ["chunk1/example_train_0.array_record", "chunk2/example_train_1.array_record"]
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and \
        "example_train_0.array_record exists" in again.stderr, again.stderr
    assert again.stderr.strip().count("\n") == 0

    ar = str(out / "chunk*" / "*.array_record")
    want = [(x["meta"]["redpajama_set_name"], x["text"]) for x in recs[0::2] + recs[1::2]]
    c = Corpus(ar, cache_dir=tmp_path / "cache")
    assert [(c.source_names[c.doc_source[i]], c.text(i)) for i in range(len(c))] == want
    second = str(out / "chunk2" / "example_train_1.array_record")
    assert [t for _, t in slimpajama.read_documents(second)] == [x["text"] for x in recs[1::2]]
    batches = {}
    for name, spec in (("jsonl", jsonl), ("arrayrecord", ar)):
        cfg = default_config()
        cfg.data.train, cfg.data.eval, cfg.data.tokenizer = spec, spec, "bytes"
        cfg.data.cache_dir = str(tmp_path / "cache")
        cfg.train.seq_len, cfg.train.batch_size, cfg.train.steps = 32, 4, 20
        ds = pipeline.StepData(cfg, tokenizer.Tokenizer.from_file("bytes")).dataset()
        batches[name] = [ds[i] for i in (0, 7, 19)]
        ev = pipeline.make_eval_batches(cfg, tokenizer.Tokenizer.from_file("bytes"), seq_len=32,
                                        batch_size=2, num_batches=2)
        batches[name] += ev
    for a, b in zip(batches["jsonl"], batches["arrayrecord"]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # a truncated file fails naming it
    bad = tmp_path / "bad" / "x.array_record"
    bad.parent.mkdir()
    data = (out / "chunk1/example_train_0.array_record").read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"x\.array_record: corrupt, truncated or not an Array"):
        Corpus(str(bad), cache_dir=tmp_path / "cache")
