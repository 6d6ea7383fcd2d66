"""The Grain pipeline: packing, mixtures, state round-trips, process sharding (btlm_jax.data)."""

import collections
import json
import random

import numpy as np
import pytest

from btlm_jax.config import default_config
from btlm_jax.data import pipeline, slimpajama, tokenizer
from btlm_jax.data.slimpajama import DataError

EOS = 256  # the bytes tokenizer: ids 0..255 are bytes, 256 is EOS
BYTES = tokenizer.Tokenizer.from_file("bytes")


def _docs(rng, n, lo, hi, tag):
    return [f"<{tag}{i}>" + "".join(rng.choice("abcdefgh ijk\n") for _ in range(rng.randint(lo, hi)))
            for i in range(n)]


def _write(tmp_path, sources: dict[str, list[str]], shards=2):
    root = tmp_path / "sp" / "train"
    recs = [{"text": t, "meta": {"redpajama_set_name": s}} for s, docs in sources.items() for t in docs]
    random.Random(0).shuffle(recs)
    for k in range(shards):
        slimpajama.write_jsonl_zst(root / f"chunk{k + 1}" / f"example_train_{k}.jsonl.zst",
                                   recs[k::shards])
    return str(root / "chunk*" / "*.jsonl.zst")


def _cfg(tmp_path, train, **data):
    cfg = default_config()
    cfg.data.train = train
    cfg.data.eval = train
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.tokenizer = "bytes"
    for k, v in data.items():
        cfg.data[k] = v
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _split_docs(stream):
    """Token stream -> list of documents (text), cutting at EOS; the last partial one dropped."""
    out, cur = [], []
    for t in stream:
        if t == EOS:
            out.append(bytes(cur).decode())
            cur = []
        else:
            cur.append(int(t))
    return out


def test_concat_packing_every_token_once_in_order(tmp_path):
    docs = _docs(random.Random(1), 40, 0, 300, "a")
    cfg = _cfg(tmp_path, _write(tmp_path, {"A": docs}), packing="concat")
    it = pipeline.make_train_iterator(cfg, BYTES, seq_len=64, batch_size=4)
    total = sum(len(d.encode()) + 1 for d in docs)
    batches = _take(it, total // (64 * 4) * 2 + 4)  # about two epochs
    rows = [b for batch in batches for b in zip(batch["inputs"], batch["targets"])]
    inputs = np.concatenate([r[0] for r in rows])
    targets = np.concatenate([r[1] for r in rows])
    # Targets are the inputs shifted by one across row boundaries: nothing dropped or repeated.
    np.testing.assert_array_equal(targets[:-1], inputs[1:])
    for b in batches:
        assert (b["segment_ids"] == 1).all() and (b["loss_mask"] == 1).all()
        assert (b["positions"] == np.arange(64)).all() and (b["source_ids"] == 0).all()
    got = _split_docs(inputs)
    n = len(docs)
    assert sorted(got[:n]) == sorted(docs)  # epoch 1: every document exactly once, intact
    assert sorted(got[n:2 * n]) == sorted(docs)  # epoch 2 too ...
    assert got[:n] != got[n:2 * n]  # ... reshuffled


def test_document_packing_segments(tmp_path):
    docs = _docs(random.Random(2), 50, 0, 120, "d")
    cfg = _cfg(tmp_path, _write(tmp_path, {"A": docs}), packing="document")
    L = 48
    it = pipeline.make_train_iterator(cfg, BYTES, seq_len=L, batch_size=2)
    rebuilt, cur = [], None
    pad = 0
    while len(rebuilt) < len(docs):
        b = next(it)
        for r in range(2):
            inp, tgt, seg, pos, mask, src = (b[k][r] for k in (
                "inputs", "targets", "segment_ids", "positions", "loss_mask", "source_ids"))
            pad += int((seg == 0).sum())
            assert ((seg > 0) == (mask > 0)).all() and ((seg > 0) == (src == 0)).all()
            # Brute-force attention mask from segment ids: allowed pairs never cross documents.
            nseg = seg.max()
            assert sorted(set(seg[seg > 0])) == list(range(1, nseg + 1))
            for s in range(1, nseg + 1):
                idx = np.flatnonzero(seg == s)
                assert (np.diff(idx) == 1).all()  # contiguous
                assert (pos[idx] == np.arange(len(idx))).all()
                np.testing.assert_array_equal(tgt[idx][:-1], inp[idx][1:])  # within-doc shift
                if inp[idx[0]] == EOS:  # a document starts here
                    assert cur is None
                    cur = []
                else:  # continuation of a document split at the previous row's end
                    assert cur is not None and s == 1
                cur += [int(t) for t in tgt[idx]]
                if cur[-1] == EOS:
                    rebuilt.append(bytes(cur[:-1]).decode())
                    cur = None
    assert sorted(rebuilt[:len(docs)]) == sorted(docs)
    assert pad > 0  # whole documents that do not fit go to the next row


@pytest.mark.parametrize("packing", ["concat", "document"])
def test_mixture_proportions_match_weights(tmp_path, packing):
    rng = random.Random(3)
    src = {"A": _docs(rng, 30, 50, 400, "a"), "B": _docs(rng, 60, 50, 400, "b"),
           "C": _docs(rng, 10, 50, 400, "c")}
    cfg = _cfg(tmp_path, _write(tmp_path, src), packing=packing, mixture="A=0.5,B=0.3,C=0.2")
    assert pipeline.source_names(cfg) == ["A", "B", "C"]
    it = pipeline.make_train_iterator(cfg, BYTES, seq_len=32, batch_size=8)
    counts = np.zeros(3)
    for b in _take(it, 100):
        for s in range(3):
            counts[s] += ((b["source_ids"] == s) * b["loss_mask"]).sum()
    share = counts / counts.sum()
    # 800 rows: binomial sampling error of a share ~ sqrt(.25/800) = 1.8 points; allow 2 sigma.
    np.testing.assert_allclose(share, [0.5, 0.3, 0.2], atol=0.036)
    # Each row's tokens really come from the labelled source (documents carry their tag).
    b = next(it)
    for row, s in zip(b["inputs"], b["source_ids"][:, 0]):
        text = bytes(int(t) for t in row if t < 256).decode(errors="replace")
        tags = {c for c in "abc" if f"<{c}" in text}
        assert tags <= {"abc"[s]}


def test_mixture_errors_and_natural(tmp_path):
    rng = random.Random(4)
    train = _write(tmp_path, {"A": _docs(rng, 10, 100, 100, "a"), "B": _docs(rng, 30, 100, 100, "b")})
    cfg = _cfg(tmp_path, train, mixture="A=1,Nope=2")
    with pytest.raises(DataError, match="Nope"):
        pipeline.make_train_iterator(cfg, BYTES, seq_len=16, batch_size=2)
    w = pipeline.mixture_weights(_cfg(tmp_path, train))
    assert w["B"] == pytest.approx(0.75, abs=0.01)  # natural: by size
    from btlm_jax.data.mixtures import parse_mixture

    with pytest.raises(DataError, match="SlimPajama-DC presets are not"):
        parse_mixture("DC-3")  # named, not silently misread as a source


@pytest.mark.parametrize("packing,prefetch", [("concat", 2), ("document", 0)])
def test_state_round_trip_gives_identical_batches(tmp_path, packing, prefetch):
    rng = random.Random(5)
    src = {"A": _docs(rng, 20, 0, 500, "a"), "B": _docs(rng, 20, 0, 200, "b")}
    cfg = _cfg(tmp_path, _write(tmp_path, src), packing=packing, prefetch=prefetch)
    it = pipeline.make_train_iterator(cfg, BYTES, seq_len=40, batch_size=4)
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    expected = _take(it, 12)
    fresh = pipeline.make_train_iterator(cfg, BYTES, seq_len=40, batch_size=4)
    fresh.set_state(state)
    for a, b in zip(expected, _take(fresh, 12)):
        for k in pipeline.FIELDS:
            np.testing.assert_array_equal(a[k], b[k])
    # Same seed -> same batches from scratch; different seed -> different.
    again = pipeline.make_train_iterator(cfg, BYTES, seq_len=40, batch_size=4)
    first = _take(again, 1)[0]
    cfg.seed = 1
    other = next(pipeline.make_train_iterator(cfg, BYTES, seq_len=40, batch_size=4))
    assert not np.array_equal(first["inputs"], other["inputs"])


def test_two_process_sharding_disjoint_and_complete(tmp_path):
    docs = _docs(random.Random(6), 31, 0, 200, "p")
    cfg = _cfg(tmp_path, _write(tmp_path, {"A": docs}), packing="concat")
    seen = []
    for p in range(2):
        it = pipeline.make_train_iterator(cfg, BYTES, seq_len=32, batch_size=4, process_index=p,
                                          process_count=2)
        stream = []
        while len(_split_docs(stream)) < 16:
            b = next(it)
            assert b["inputs"].shape == (2, 32)
            stream += list(b["inputs"].reshape(-1))
        got = _split_docs(stream)
        n = len(set(got))  # this process's share: one epoch before the first repeat
        first_epoch = got[:next(i for i in range(1, len(got) + 1)
                                if i == len(got) or got[i] in got[:i])]
        seen.append(first_epoch)
    a, b = set(seen[0]), set(seen[1])
    assert not (a & b)
    assert sorted(seen[0] + seen[1]) == sorted(docs)


def test_eval_batches_deterministic(tmp_path):
    rng = random.Random(7)
    cfg = _cfg(tmp_path, _write(tmp_path, {"A": _docs(rng, 5, 10, 400, "a"),
                                           "B": _docs(rng, 5, 10, 400, "b")}))
    e1 = pipeline.make_eval_batches(cfg, BYTES, seq_len=32, batch_size=4, num_batches=3)
    e2 = pipeline.make_eval_batches(cfg, BYTES, seq_len=32, batch_size=4, num_batches=3)
    assert len(e1) == 3
    for a, b in zip(e1, e2):
        assert set(a) == set(pipeline.FIELDS) and a["inputs"].shape == (4, 32)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    ids = np.concatenate([b["source_ids"][:, 0] for b in e1])
    assert collections.Counter(ids.tolist()) == {0: 6, 1: 6}


def test_missing_train_path_error(tmp_path):
    cfg = _cfg(tmp_path, str(tmp_path / "nothing" / "*.jsonl.zst"))
    with pytest.raises(DataError, match=r"data\.train=.*nothing/\*\.jsonl\.zst"):
        pipeline.make_train_iterator(cfg, BYTES, seq_len=16, batch_size=2)


def test_skipped_records_are_counted_on_the_iterator(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    good = [json.dumps({"text": f"document number {i} " * 5, "meta": {"redpajama_set_name": "A"}})
            for i in range(6)]
    (d / "x.jsonl").write_text("\n".join(good[:3] + ["{broken", "[1, 2]"] + good[3:]) + "\n")
    cfg = _cfg(tmp_path, str(d / "*.jsonl"))
    with pytest.raises(DataError, match=r"x\.jsonl:4"):
        pipeline.make_train_iterator(cfg, BYTES, seq_len=16, batch_size=2)
    cfg.data.on_error = "skip"
    it = pipeline.make_train_iterator(cfg, BYTES, seq_len=16, batch_size=2)
    assert it.skipped_documents == 2 == pipeline.skipped_records(cfg)
    stream = np.concatenate([next(it)["inputs"].reshape(-1) for _ in range(40)])
    assert sorted(set(_split_docs(stream))) == sorted(json.loads(g)["text"] for g in good)
