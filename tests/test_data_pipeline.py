"""Step-keyed training data (btlm_jax.data.pipeline.StepData) over the packed store
(btlm_jax.data.store): packing, per-step mixture proportions, epochs, phases, process count
independence, evaluation batches, errors."""

import collections
import glob
import json
import random
from fractions import Fraction

import numpy as np
import pytest

from btlm_jax.config import default_config
from btlm_jax.data import mixtures, pipeline, slimpajama, tokenizer
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


def _cfg(tmp_path, train, *, seq_len=32, batch=4, steps=1000, phases=(), **data):
    cfg = default_config()
    cfg.data.train = train
    cfg.data.eval = train
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.tokenizer = "bytes"
    cfg.train.seq_len, cfg.train.batch_size, cfg.train.steps = seq_len, batch, steps
    cfg.train.phases = phases
    for k, v in data.items():
        cfg.data[k] = v
    return cfg


def _file_order_docs(train_glob, source):
    """The documents of ``source`` in the order of the sorted files (read independently)."""
    out = []
    for path in sorted(glob.glob(train_glob)):
        out += [t for s, t in slimpajama.read_documents(path) if s == source]
    return out


def _row_key(b, r):
    return (tuple(b["inputs"][r]), tuple(b["targets"][r]), tuple(b["segment_ids"][r]))


def test_concat_rows_are_windows_of_the_stream_once_per_epoch(tmp_path):
    docs = _docs(random.Random(1), 40, 0, 300, "a")
    train = _write(tmp_path, {"A": docs})
    L, B = 64, 4
    cfg = _cfg(tmp_path, train, seq_len=L, batch=B, packing="concat")
    # The reference stream: each document's bytes + EOS, in file order.
    stream = np.concatenate([np.asarray(list(d.encode()) + [EOS]) for d in
                             _file_order_docs(train, "A")])
    R = (len(stream) - 1) // L
    windows = {tuple(stream[r * L:r * L + L + 1]): r for r in range(R)}
    data = pipeline.StepData(cfg, BYTES)
    seen = []
    for step in range(2 * R // B + 1):
        b = data.local_batch(step)
        assert (b["segment_ids"] == 1).all() and (b["loss_mask"] == 1).all()
        assert (b["positions"] == np.arange(L)).all() and (b["source_ids"] == 0).all()
        for r in range(B):
            np.testing.assert_array_equal(b["inputs"][r][1:], b["targets"][r][:-1])
            seen.append(windows[tuple(b["inputs"][r]) + (b["targets"][r][-1],)])
    e1, e2 = seen[:R], seen[R:2 * R]
    assert sorted(e1) == list(range(R)) and sorted(e2) == list(range(R))  # each row once
    assert e1 != e2 and e1 != sorted(e1)  # shuffled, reshuffled each epoch


def test_document_packing_segments_and_every_document_once(tmp_path):
    docs = _docs(random.Random(2), 50, 0, 120, "d")
    L, B = 48, 2
    cfg = _cfg(tmp_path, _write(tmp_path, {"A": docs}), seq_len=L, batch=B, packing="document")
    data = pipeline.StepData(cfg, BYTES)
    rows = data._source_rows(0, 0)
    R = len(rows)
    by_index = rows.take(np.arange(R))
    # Rebuild the documents from the store's rows in order (a split document continues in the
    # next row); check segments against a brute-force reading of the arrays.
    rebuilt, cur, pad = [], None, 0
    for r in range(R):
        inp, tgt, seg, pos, mask, src = (by_index[k][r] for k in (
            "inputs", "targets", "segment_ids", "positions", "loss_mask", "source_ids"))
        pad += int((seg == 0).sum())
        assert ((seg > 0) == (mask > 0)).all() and ((seg > 0) == (src == 0)).all()
        assert (src[seg == 0] == -1).all() and (pos[seg == 0] == 0).all()
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
                assert cur is not None and s == 1 and idx[0] == 0
            cur += [int(t) for t in tgt[idx]]
            if cur[-1] == EOS:
                rebuilt.append(bytes(cur[:-1]).decode())
                cur = None
    assert rebuilt == _file_order_docs(str(tmp_path / "sp/train/chunk*/*.jsonl.zst"), "A")
    assert pad > 0  # whole documents that do not fit go to the next row
    # The step batches cover every stored row once per epoch.
    keys = {_row_key(by_index, r): r for r in range(R)}
    seen = [keys[_row_key(b, r)] for step in range(R // B)
            for b in [data.local_batch(step)] for r in range(B)]
    assert len(set(seen)) == len(seen) == R // B * B


def _brute_force_interleave(weights, n):
    """The first n (source, k) of the merged arrival sequences (k + 1/2) / w_s, exact."""
    W = mixtures.Interleave(weights).W
    arr = sorted((Fraction(2 * k + 1, W[s]), s, k)
                 for s in range(len(W)) if W[s] > 0 for k in range(n))
    return [(s, k) for _, s, k in arr[:n]]


def test_interleave_matches_brute_force_and_keeps_per_step_proportions():
    w = [52.2, 26.7, 5.2, 4.2, 4.6, 3.8, 3.3]  # SlimPajama's token shares
    il = mixtures.Interleave(w)
    ref = _brute_force_interleave(w, 3000)
    assert il.rows(0, 3000) == ref
    assert il.rows(1234, 1301) == ref[1234:1301]  # random access, no replay
    share = np.asarray(w) / sum(w)
    for h in list(range(0, 3000, 7)) + [10**9 + 17]:
        c = np.asarray(il.counts_before(h))
        assert c.sum() == h
        assert np.abs(c - share * h).max() < 2  # never more than 2 rows off the weights
    assert mixtures.Interleave([0.5, 0.0, 0.5]).rows(0, 10).count((1, 0)) == 0


@pytest.mark.parametrize("packing", ["concat", "document"])
def test_mixture_proportions_every_step(tmp_path, packing):
    rng = random.Random(3)
    src = {"A": _docs(rng, 30, 50, 400, "a"), "B": _docs(rng, 60, 50, 400, "b"),
           "C": _docs(rng, 10, 50, 400, "c")}
    B = 10
    cfg = _cfg(tmp_path, _write(tmp_path, src), seq_len=32, batch=B, packing=packing,
               mixture="A=0.5,B=0.3,C=0.2")
    assert pipeline.source_names(cfg) == ["A", "B", "C"]
    data = pipeline.StepData(cfg, BYTES)
    for step in range(20):
        b = data.local_batch(step)
        rows = collections.Counter(int(s) for s in b["source_ids"][:, 0])
        assert rows == {0: 5, 1: 3, 2: 2}, (step, rows)  # exactly the weights, every step
        # each row's tokens really come from the labelled source (documents carry their tag)
        for row, s in zip(b["inputs"], b["source_ids"][:, 0]):
            text = bytes(int(t) for t in row if t < 256).decode(errors="replace")
            assert {c for c in "abc" if f"<{c}" in text} <= {"abc"[s]}


@pytest.mark.parametrize("packing,rollbacks", [("document", []), ("concat", [(5, 2, 1)])])
def test_global_batch_independent_of_process_count_across_phases(tmp_path, packing, rollbacks):
    from btlm_jax.data.positions import Rollback

    rng = random.Random(4)
    src = {"A": _docs(rng, 20, 0, 500, "a"), "B": _docs(rng, 20, 0, 200, "b")}
    cfg = _cfg(tmp_path, _write(tmp_path, src), packing=packing,
               phases=("16:8:3", "32:4:3"))
    log = [Rollback(*r) for r in rollbacks]
    one = pipeline.StepData(cfg, BYTES, rollbacks=log)
    many = {n: [pipeline.StepData(cfg, BYTES, p, n, rollbacks=log) for p in range(n)]
            for n in (2, 4)}
    for step in range(6):
        ref = one.local_batch(step)
        assert ref["inputs"].shape == ((8, 16) if step < 3 else (4, 32))
        for n, parts in many.items():
            got = [d.local_batch(step) for d in parts]
            assert got[0]["inputs"].shape[0] == ref["inputs"].shape[0] // n
            for k in pipeline.FIELDS:
                np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), ref[k])
        np.testing.assert_array_equal(one.rows(step, 1, 3)["targets"], ref["targets"][1:3])


def test_random_access_resume_and_seed(tmp_path):
    rng = random.Random(5)
    cfg = _cfg(tmp_path, _write(tmp_path, {"A": _docs(rng, 20, 0, 500, "a"),
                                           "B": _docs(rng, 20, 0, 200, "b")}))
    it = pipeline.StepData(cfg, BYTES).reader(0, prefetch=2)  # the feed's: Grain's threads
    seq = [next(it) for _ in range(40)]
    it.close()
    b = pipeline.StepData(cfg, BYTES)  # "resumed": a fresh object, steps in any order
    for s in [33, 7, 39, 0, 21]:
        for k in pipeline.FIELDS:
            np.testing.assert_array_equal(b.local_batch(s)[k], seq[s][k])
    cfg.seed = 1
    c = pipeline.StepData(cfg, BYTES)
    assert not np.array_equal(c.local_batch(0)["inputs"], seq[0]["inputs"])


def test_store_built_once_and_reused(tmp_path):
    cfg = _cfg(tmp_path, _write(tmp_path, {"A": _docs(random.Random(6), 10, 10, 100, "a")}),
               phases=("16:4:2", "32:2:2"))
    logs = []
    for _ in range(2):
        d = pipeline.StepData(cfg, BYTES, log=logs.append)
        assert d.local_batch(0)["inputs"].shape == (4, 16)
        assert d.local_batch(3)["inputs"].shape == (2, 32)
    # one concat store serves both phases' lengths, built by the first run only
    assert len(logs) == 1 and "built the packed store" in logs[0]
    stores = [p for p in (tmp_path / "cache" / "store").iterdir() if p.is_dir()]
    assert len(stores) == 1
    meta = json.loads((stores[0] / "meta.json").read_text())
    assert meta["tokens"] == sum(len(d.encode()) + 1 for d in
                                 _file_order_docs(str(tmp_path / "sp/train/chunk*/*.jsonl.zst"), "A"))


def test_tokens_per_step_concat(tmp_path):
    """Concat packing: every token of a batch is a loss token, so steps x B x L in total."""
    cfg = _cfg(tmp_path, _write(tmp_path, {"A": _docs(random.Random(7), 10, 10, 400, "a"),
                                           "B": _docs(random.Random(8), 10, 10, 400, "b")}),
               seq_len=16, batch=6)
    data = pipeline.StepData(cfg, BYTES, 1, 3)
    per_source = np.zeros(2)
    for s in range(9):
        b = data.local_batch(s)
        for i in range(2):
            per_source[i] += ((b["source_ids"] == i) * b["loss_mask"]).sum()
    assert per_source.sum() == 9 * 2 * 16  # this process's 2 of the 6 rows


def test_natural_mixture_is_by_tokens(tmp_path):
    """data.mixture empty: each source weighs its tokens (the store's exact counts: bytes + EOS
    per document with the bytes tokenizer), not its size on disk."""
    rng = random.Random(13)
    src = {"A": [f"a{i}" + "x" * rng.randint(0, 6) for i in range(300)],
           "B": ["b" * 3000, "c" * 2500]}
    cfg = _cfg(tmp_path, _write(tmp_path, src))
    tokens = {s: sum(len(d.encode()) + 1 for d in docs) for s, docs in src.items()}
    w = pipeline.mixture_weights(cfg, BYTES)
    total = sum(tokens.values())
    assert w == {s: pytest.approx(n / total, rel=1e-12) for s, n in tokens.items()}
    data = pipeline.StepData(cfg, BYTES)
    assert data.weights == w


def test_mixture_errors_and_natural(tmp_path):
    rng = random.Random(4)
    train = _write(tmp_path, {"A": _docs(rng, 10, 100, 100, "a"), "B": _docs(rng, 30, 100, 100, "b")})
    cfg = _cfg(tmp_path, train, mixture="A=1,Nope=2")
    with pytest.raises(DataError, match="Nope"):
        pipeline.StepData(cfg, BYTES)
    w = pipeline.mixture_weights(_cfg(tmp_path, train), BYTES)
    assert w["B"] == pytest.approx(0.75, abs=0.01)  # natural: by tokens
    from btlm_jax.data.mixtures import parse_mixture

    with pytest.raises(DataError, match="SlimPajama-DC presets are not"):
        parse_mixture("DC-3")  # named, not silently misread as a source
    with pytest.raises(DataError, match=r"train\.batch_size: global batch 4 .* 3 processes"):
        pipeline.StepData(_cfg(tmp_path, train), BYTES, 0, 3)


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
        pipeline.StepData(cfg, BYTES)


def test_skipped_records_are_counted(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    good = [json.dumps({"text": f"document number {i} " * 5, "meta": {"redpajama_set_name": "A"}})
            for i in range(6)]
    (d / "x.jsonl").write_text("\n".join(good[:3] + ["{broken", "[1, 2]"] + good[3:]) + "\n")
    cfg = _cfg(tmp_path, str(d / "*.jsonl"), seq_len=16, batch=2)
    with pytest.raises(DataError, match=r"x\.jsonl:4"):
        pipeline.StepData(cfg, BYTES)
    cfg.data.on_error = "skip"
    data = pipeline.StepData(cfg, BYTES)
    assert data.skipped_records == 2 == pipeline.skipped_records(cfg)
    rows = data._source_rows(0, 0)
    stream = rows.take(np.arange(len(rows)))["inputs"].reshape(-1)
    texts = bytes(int(t) if t < 256 else 10 for t in stream).decode().split("\n")
    for g in good[:5]:  # the last document may be in the dropped tail
        assert json.loads(g)["text"] in texts


@pytest.mark.parametrize("dense", [True, False])  # NumPy permutations / Grain's index shuffle
def test_epoch_order_is_a_fresh_permutation_each_epoch(monkeypatch, dense):
    from grain.experimental import index_shuffle

    from btlm_jax.data import units

    monkeypatch.setattr(units.UnitOrder, "DENSE_MAX", 1000 if dense else 10)
    n, seed = 37, 5
    order = units.UnitOrder(n, seed)
    got = np.asarray([order[k] for k in range(3 * n)])
    epochs = got.reshape(3, n)
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert not (epochs[0] == epochs[1]).all() and not (epochs[0] == np.arange(n)).all()
    # the documented functions: NumPy's permutation per (seed, epoch) / Grain's index_shuffle
    # with seed + epoch, entry by entry
    for e in range(3):
        want = (np.random.default_rng((seed, e)).permutation(n) if dense else
                [index_shuffle(k, max_index=n - 1, seed=seed + e, rounds=4) for k in range(n)])
        np.testing.assert_array_equal(epochs[e], want)
        np.testing.assert_array_equal(order.permutation(e), want)
    fresh = units.UnitOrder(n, seed)  # a pure function: random access, any order, any object
    np.testing.assert_array_equal(fresh._getitems([80, 3, 40, 3]), got[[80, 3, 40, 3]])


@pytest.mark.slow  # Grain's worker processes start in about 2 s (each imports grain and JAX)
def test_store_build_with_worker_processes_is_identical(tmp_path):
    from btlm_jax.data import store

    cfg = _cfg(tmp_path, _write(tmp_path, {"A": _docs(random.Random(9), 600, 0, 50, "a")}),
               packing="document")
    corpus = pipeline.load_corpus(cfg, cfg.data.train, "data.train")
    out = {}
    for w in (0, 2):
        store.build(corpus, BYTES, tmp_path / f"s{w}", seq_len=40, packing="document",
                    num_workers=w)
        out[w] = {p.name: p.read_bytes() for p in (tmp_path / f"s{w}").iterdir()
                  if p.suffix == ".bin"}
    assert out[0] == out[2] and len(out[0]) == 3


# ----------------------------------------------------------------------------------------------
# One data position across phases and rollbacks (issue 28; btlm_jax.data.positions)


def _target_positions(stream_by_source, batch, L):
    """(source, stream offset of each target) of every row, found by content in the streams."""
    out = []
    for r in range(batch["inputs"].shape[0]):
        s = int(batch["source_ids"][r, 0])
        key = np.concatenate([batch["inputs"][r], batch["targets"][r, -1:]])
        hits = stream_by_source[s][L].get(key.tobytes())
        assert hits is not None, "a row that is no window of its source's stream"
        out.append((s, hits))
    return out


def test_phases_read_each_token_at_most_once(tmp_path):
    """Two phases (16 x 6, then 48 x 2) over less than one pass: no target token of either
    source is read twice, and the second phase starts past the first one's tokens."""
    rng = random.Random(11)
    src = {"A": _docs(rng, 60, 0, 300, "a"), "B": _docs(rng, 40, 0, 300, "b")}
    train = _write(tmp_path, src)
    cfg = _cfg(tmp_path, train, phases=("16:6:40", "48:2:40"), steps=80, mixture="A=0.6,B=0.4")
    streams, index = {}, {}
    for i, name in enumerate(("A", "B")):
        st = np.concatenate([np.asarray(list(d.encode()) + [EOS]) for d in
                             _file_order_docs(train, name)]).astype(np.int32)
        streams[i] = st
        index[i] = {L: {st[o:o + L + 1].tobytes(): o for o in range(0, len(st) - L, L)}
                    for L in (16, 48)}
    assert 40 * 6 * 16 + 40 * 2 * 48 < 0.75 * sum(len(s) for s in streams.values())
    data = pipeline.StepData(cfg, BYTES)
    seen = {i: np.zeros(len(s), np.int32) for i, s in streams.items()}  # phase + 1 that read it
    for step in range(80):
        L = 16 if step < 40 else 48
        for s, off in _target_positions(index, data.local_batch(step), L):
            mark = seen[s][off + 1:off + L + 1]
            assert not mark.any(), (step, s, off, set(mark.tolist()))
            mark[:] = 1 + (step >= 40)
    for i in seen:  # phase 2 lies past phase 1 only in shuffled unit order, not in the stream
        assert (seen[i] == 1).any() and (seen[i] == 2).any()


def test_document_phases_read_each_document_at_most_once(tmp_path):
    """Document packing with two lengths: the documents are packed in units shared by both
    lengths, so no document starts in the rows of both phases (or twice in one)."""
    rng = random.Random(12)
    docs = _docs(rng, 400, 0, 120, "d")
    cfg = _cfg(tmp_path, _write(tmp_path, {"A": docs}), packing="document",
               phases=("16:4:150", "40:2:90"), steps=240)
    data = pipeline.StepData(cfg, BYTES)
    starts = collections.Counter()
    read = 0
    for step in range(240):
        b = data.local_batch(step)
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            for s in set(seg[seg > 0].tolist()):
                idx = np.flatnonzero(seg == s)
                read += len(idx)
                if b["inputs"][r, idx[0]] == EOS:  # a document starts here: its tag follows
                    text = bytes(int(t) for t in b["inputs"][r, idx[1:]] if t < 256).decode()
                    if ">" in text:  # the whole tag (a row may end inside it)
                        starts[text.split(">")[0]] += 1
    assert read < 0.75 * sum(len(d.encode()) + 1 for d in docs)
    assert len(starts) > 50 and max(starts.values()) == 1, starts.most_common(3)


def _simulate(phases, weights, rollbacks, per_unit):
    """The rows (source, unit position, row in unit) of every batch of the final trajectory,
    by executing the run's history row by row: every segment starts at the first unit no read
    so far touched; a rollback's segment also no earlier than ``skip`` batches past the restored
    step's position (read on in that segment's row order)."""
    W = mixtures.Interleave(weights).W
    S = len(W)
    starts = [sum(p[2] for p in phases[:i]) for i in range(len(phases))]
    total = sum(p[2] for p in phases)

    def phase_of(i):
        return max(k for k in range(len(phases)) if starts[k] <= i)

    def arrivals(n):  # the first n (source, k) of a segment, merged by (k + 1/2) / w
        return _brute_force_interleave(weights, n)

    def execute(first, begin, last, high):
        """Batches first .. last - 1 from unit positions ``begin``; returns their rows, the
        cursors before each batch and the new high water."""
        rows, before = {}, {}
        seg_start, units, count = first, list(begin), [0] * S
        for i in range(first, last):
            ph = phase_of(i)
            if i > first and ph != phase_of(i - 1):  # a new phase: a new segment
                seg_start, units, count = i, list(high), [0] * S
            before[i] = (seg_start, tuple(units), tuple(count))
            L, B, _ = phases[ph]
            m = per_unit[ph]
            h0 = (i - seg_start) * B
            got = arrivals(h0 + B)[h0:]
            rows[i] = []
            for s, k in got:
                assert k == count[s]
                count[s] += 1
                rows[i].append((s, units[s] + k // m, k % m))
                high[s] = max(high[s], units[s] + k // m + 1)
        return rows, before, high

    high = [0] * S
    final, trajectory, first, begin = {}, {}, 0, [0] * S
    for (n, g, skip) in list(rollbacks) + [(None, None, None)]:
        last = total if n is None else n
        rows, before, high = execute(first, begin, last, high)
        for i in range(first, last):
            final[i], trajectory[i] = rows[i], before[i]
        if n is None:
            break
        seg_start, units, count = trajectory[g]
        ph = phase_of(g)
        B, m = phases[ph][1], per_unit[ph]
        h0 = (g - seg_start) * B
        after = list(units)  # the position after `skip` more batches of this segment
        for s, k in arrivals(h0 + skip * B):
            after[s] = max(after[s], units[s] + k // m + 1)
        first, begin = g, [max(a, b) for a, b in zip(after, high)]
    return [final[i] for i in range(total)]


class _Uniform:
    def __init__(self, per_unit):
        self.per_unit = per_unit

    def end(self, source, phase, start, rows):
        return start + -(-rows // self.per_unit[phase])


@pytest.mark.parametrize("rollbacks", [
    [],
    [(7, 5, 1)],  # within phase 0, a small skip: the spike bound wins
    [(7, 5, 6)],  # within phase 0, a larger skip
    [(12, 6, 2), (15, 14, 0), (16, 9, 3)],  # across the phase boundary, back again, and back
])
def test_plan_matches_a_row_by_row_simulation(rollbacks):
    from btlm_jax.data import positions

    phases = [(16, 6, 10), (48, 2, 8)]
    weights = [0.5, 0.3, 0.2]
    per_unit = {0: 3, 1: 1}  # concat: units of lcm(16, 48) = 48 tokens
    log = [positions.Rollback(n, g, k) for n, g, k in rollbacks]
    plan = positions.Plan(phases, mixtures.Interleave(weights), _Uniform(per_unit), log)
    want = _simulate(phases, weights, rollbacks, per_unit)
    for i, rows in enumerate(want):
        seg, got = plan.rows(i, 0, phases[plan.phase_of(i)][1])
        m = per_unit[seg.phase]
        assert [(s, seg.units[s] + k // m, k % m) for s, k in got] == rows, i


# ----------------------------------------------------------------------------------------------
# The chain of grain.MapDatasets (issue 29): data.transforms, Grain's reader and worker processes

VOWELS = np.asarray([ord(c) for c in "aeiou"])


def no_loss_on_vowels(rows):
    """A per-row token filter (data.transforms): no loss on predicting a vowel."""
    def f(row):
        return {**row, "loss_mask": row["loss_mask"] * ~np.isin(row["targets"], VOWELS)}
    return rows.map(f)


def row_number(rows):
    """Adds each row's index in the run's row sequence (map_with_index)."""
    return rows.map_with_index(lambda i, row: {**row, "row": np.full(4, i, np.int64)})


def noise(rows):
    """A random transform: Grain draws per row index, so every process draws the same."""
    return rows.random_map(lambda row, rng: {**row, "noise": rng.integers(0, 1 << 30, 4)},
                           seed=7)


def drop_odd(rows):
    return rows.filter(lambda row: int(row["inputs"][0]) % 2 == 0)


def _transform_cfg(tmp_path, **kw):
    rng = random.Random(21)
    src = {"A": _docs(rng, 20, 0, 300, "a"), "B": _docs(rng, 20, 0, 300, "b")}
    return _cfg(tmp_path, _write(tmp_path, src), phases=("16:4:3", "32:2:3"), steps=6, **kw)


def test_transforms_apply_per_row_before_batching_and_process_split(tmp_path):
    import grain

    here = "tests.test_data_pipeline"
    cfg = _transform_cfg(tmp_path)
    plain = pipeline.StepData(cfg, BYTES)
    cfg.data.transforms = (f"{here}:no_loss_on_vowels", f"{here}:row_number", f"{here}:noise")
    data = pipeline.StepData(cfg, BYTES)
    ds = data.dataset()
    assert isinstance(ds, grain.MapDataset) and len(ds) == 6
    halves = [pipeline.StepData(cfg, BYTES, p, 2).dataset() for p in range(2)]
    first_row = 0
    for step in range(6):
        ref, got = plain.global_batch(step), ds[step]
        b = ref["inputs"].shape[0]
        np.testing.assert_array_equal(got["inputs"], ref["inputs"])
        vowel = np.isin(ref["targets"], VOWELS)
        assert vowel.any()
        np.testing.assert_array_equal(got["loss_mask"], np.where(vowel, 0.0, ref["loss_mask"]))
        # the index a transform sees is the row's place in the run's row sequence
        np.testing.assert_array_equal(got["row"][:, 0], first_row + np.arange(b))
        first_row += b
        # two processes: each transforms its own rows, and together they make the same batch
        parts = [h[step] for h in halves]
        for k in ("inputs", "loss_mask", "row", "noise"):
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), got[k])
        np.testing.assert_array_equal(data.rows(step, 1, 2)["noise"], got["noise"][1:2])
    assert len({tuple(x) for x in np.concatenate([ds[s]["noise"] for s in range(6)])}) == 18


def test_transform_errors_name_the_entry(tmp_path):
    from btlm_jax.config import ConfigError, validate

    cfg = _transform_cfg(tmp_path)
    for spec, what in [("tests.test_data_pipeline:drop_odd", r"transforms\[0\].*filters rows"),
                       ("nosuchmodule_xyz:f", r"transforms\[0\].*cannot import 'nosuchmodule"),
                       ("tests.test_data_pipeline:nope", r"has no 'nope'")]:
        cfg.data.transforms = (spec,)
        with pytest.raises(DataError, match=what):
            pipeline.StepData(cfg, BYTES)
    cfg.data.transforms = ("tests.test_data_pipeline:noise", 3)
    with pytest.raises(ConfigError, match=r"data\.transforms=.*tuple of 'module:function'"):
        validate(cfg)
    cfg.data.transforms, cfg.data.prefetch = (), -1
    with pytest.raises(ConfigError, match=r"data\.prefetch=-1: must be an integer >= 0"):
        validate(cfg)


@pytest.mark.slow  # Grain's worker processes start in about 2 s (each imports grain and JAX)
def test_grain_reader_threads_and_worker_processes_match_random_access(tmp_path):
    """StepData.reader (the feed's iterator): Grain's prefetch threads and two worker processes
    (mp_prefetch; the chain, a user transform included, pickled into them) yield dataset[i]."""
    cfg = _transform_cfg(tmp_path, transforms=("tests.test_data_pipeline:noise",))
    data = pipeline.StepData(cfg, BYTES)
    ds = data.dataset()
    for prefetch, workers in ((2, 0), (1, 2)):
        it = data.reader(2, prefetch=prefetch, workers=workers)
        got = list(it)
        it.close()
        assert len(got) == 4
        for step, b in zip(range(2, 6), got):
            for k in pipeline.FIELDS + ("noise",):
                np.testing.assert_array_equal(b[k], ds[step][k], err_msg=f"{k} {step} {workers}")
