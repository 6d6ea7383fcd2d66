"""End-to-end tests of the dedup pipeline on small planted corpora built in tmp_path."""

import json
import os
import random
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
import zstandard

from btlm_jax.data.dedup import DedupConfig, DedupInputError, run_dedup


def write_shard(path, records):
    """records: dicts (serialised as JSON) or raw bytes lines."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode("utf-8")) + b"\n" for r in records
    )
    if str(path).endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as fh:
        fh.write(data)


def read_shard(path):
    with open(path, "rb") as fh:
        data = fh.read()
    if str(path).endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def rec(text, source="RedPajamaC4", **extra):
    return {"text": text, "meta": {"redpajama_set_name": source, **extra}}


def random_text(rng, n_chars):
    words = []
    while sum(len(w) + 1 for w in words) < n_chars:
        words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))))
    return " ".join(words)[:n_chars].strip()


def char_shingles(text, n=13):
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def run(tmp_path, name, **kw):
    kw.setdefault("inputs", [str(tmp_path / "in" / "**" / "*.jsonl*")])
    cfg = DedupConfig(output=str(tmp_path / name), progress=False, **kw)
    return run_dedup(cfg), tmp_path / name


@pytest.mark.slow
def test_detection_rate_follows_s_curve(tmp_path):
    """Planted pairs at exactly computed Jaccard similarities are detected at the rate
    1 - (1 - s^13)^9, within binomial sampling error, at each similarity level."""
    rng = random.Random(12345)
    levels = [0.6, 0.75, 0.8, 0.85, 0.9, 0.95]
    per_level = 250
    length = 400
    records, pairs = [], []
    for target in levels:
        for _ in range(per_level):
            a = random_text(rng, length)
            # Replace a tail so that shared / union of the 13-gram sets is about `target`.
            # Shared 13-grams: length - tail - 12; each side has `tail` of its own.
            tail = int(round((length - 12) * (1 - target) / (1 + target)))
            b = a[: length - tail] + random_text(rng, tail + 1)[:tail]
            sa, sb = char_shingles(a), char_shingles(b)
            j = len(sa & sb) / len(sa | sb)
            pairs.append((target, j, len(records), len(records) + 1))
            records += [rec(a), rec(b)]
    write_shard(tmp_path / "in" / "c1" / "x.jsonl", records[: len(records) // 2])
    write_shard(tmp_path / "in" / "c2" / "y.jsonl.zst", records[len(records) // 2:])
    stats, out = run(tmp_path, "out")
    assert stats["total"]["short"]["documents"] == 0

    def doc_id(i):
        half = len(records) // 2
        return f"c1/x.jsonl:{i + 1}" if i < half else f"c2/y.jsonl.zst:{i - half + 1}"

    removed = {}
    with open(out / "duplicates.jsonl") as fh:
        for line in fh:
            d = json.loads(line)
            removed[d["id"]] = d["duplicate_of"]
    chi2 = 0.0
    for target in levels:
        sel = [p for p in pairs if p[0] == target]
        js = np.array([p[1] for p in sel], dtype=np.float64)
        assert abs(js.mean() - target) < 0.01  # the construction hits its level
        prob = 1.0 - (1.0 - js**13) ** 9
        detected = 0
        for _, _, ia, ib in sel:
            if doc_id(ib) in removed:
                assert removed[doc_id(ib)] == doc_id(ia)
                detected += 1
            assert doc_id(ia) not in removed
        expected, var = prob.sum(), (prob * (1 - prob)).sum()
        assert abs(detected - expected) <= 4 * np.sqrt(var) + 1, (target, detected, expected)
        chi2 += (detected - expected) ** 2 / max(var, 1e-9)
    # Pooled over levels (6 degrees of freedom): P(chi2 > 22.5) = 0.001.
    assert chi2 < 22.5
    assert len(removed) == sum(1 for _ in open(out / "duplicates.jsonl"))


def _cross_source_corpus(tmp_path, rng):
    shared = random_text(rng, 500)
    write_shard(tmp_path / "in" / "cc" / "a.jsonl.zst",
                [rec(random_text(rng, 500), "RedPajamaCommonCrawl"), rec(shared, "RedPajamaCommonCrawl")])
    write_shard(tmp_path / "in" / "wiki" / "b.jsonl",
                [rec(shared.upper() + "!!", "RedPajamaWikipedia"), rec(random_text(rng, 500), "RedPajamaWikipedia")])
    # Also a duplicate within one source, removed in both modes.
    inner = random_text(rng, 450)
    write_shard(tmp_path / "in" / "wiki" / "c.jsonl",
                [rec(inner, "RedPajamaWikipedia"), rec(inner + " ", "RedPajamaWikipedia")])
    return shared


def test_global_removes_cross_source_duplicate_local_keeps(tmp_path):
    rng = random.Random(5)
    _cross_source_corpus(tmp_path, rng)
    g, gout = run(tmp_path, "global", mode="global")
    l, lout = run(tmp_path, "local", mode="local")
    assert g["total"]["duplicates"]["documents"] == 2
    assert l["total"]["duplicates"]["documents"] == 1
    gdups = [json.loads(x) for x in open(gout / "duplicates.jsonl")]
    assert {(d["id"], d["duplicate_of"]) for d in gdups} == {
        ("wiki/b.jsonl:1", "cc/a.jsonl.zst:2"), ("wiki/c.jsonl:2", "wiki/c.jsonl:1")}
    assert gdups[0]["source"] == "RedPajamaWikipedia"
    assert gdups[0]["duplicate_of_source"] == "RedPajamaCommonCrawl"
    assert g["duplicates_by_source"] == {"RedPajamaWikipedia": {"RedPajamaCommonCrawl": 1,
                                                                 "RedPajamaWikipedia": 1}}
    ldups = [json.loads(x) for x in open(lout / "duplicates.jsonl")]
    assert [(d["id"], d["duplicate_of"]) for d in ldups] == [("wiki/c.jsonl:2", "wiki/c.jsonl:1")]
    assert len(read_shard(gout / "wiki" / "b.jsonl")) == 1
    assert len(read_shard(lout / "wiki" / "b.jsonl")) == 2
    assert g["per_source"]["RedPajamaWikipedia"]["duplicates"]["documents"] == 2
    assert g["per_source"]["RedPajamaCommonCrawl"]["duplicates"]["documents"] == 0
    assert g["clusters"]["size_histogram"] == {"2": 2}


def test_output_text_layout_and_stats(tmp_path):
    rng = random.Random(9)
    long_a = random_text(rng, 300) + " cafe\u0301 na\u0131\u0308ve"  # decomposed accents
    long_b = random_text(rng, 300)
    short = "Too short, " * 10  # 110 characters before normalisation
    dup_of_b = long_b.replace(" ", "  ").title() + "."
    shards = {
        "train/chunk1/example_train_0.jsonl.zst": [rec(long_a, "RedPajamaArXiv", id=7), rec(short, "RedPajamaArXiv")],
        "train/chunk2/example_train_1.jsonl": [rec(long_b, "RedPajamaBook"), rec(dup_of_b, "RedPajamaBook")],
    }
    for rel, recs in shards.items():
        write_shard(tmp_path / "in" / rel, recs)
    stats, out = run(tmp_path, "out")
    assert sorted(os.listdir(out)) == ["duplicates.jsonl", "stats.json", "train"]
    kept_a = read_shard(out / "train/chunk1/example_train_0.jsonl.zst")
    assert kept_a == [rec(unicodedata.normalize("NFC", long_a), "RedPajamaArXiv", id=7)]
    assert kept_a[0]["text"] != long_a  # it really was re-composed
    assert read_shard(out / "train/chunk2/example_train_1.jsonl") == [rec(long_b, "RedPajamaBook")]

    nbytes = lambda t: len(unicodedata.normalize("NFC", t).encode("utf-8"))
    t = stats["total"]
    assert t["input"] == {"documents": 4, "bytes": sum(nbytes(x) for x in (long_a, short, long_b, dup_of_b))}
    assert t["short"] == {"documents": 1, "bytes": nbytes(short)}
    assert t["duplicates"] == {"documents": 1, "bytes": nbytes(dup_of_b)}
    assert t["kept"] == {"documents": 2, "bytes": nbytes(long_a) + nbytes(long_b)}
    assert stats["per_source"]["RedPajamaArXiv"]["short"]["documents"] == 1
    assert stats["per_source"]["RedPajamaBook"]["kept"]["documents"] == 1
    assert json.load(open(out / "stats.json"))["total"] == t

    # Refuses to overwrite a non-empty output directory, or the inputs.
    with pytest.raises(DedupInputError, match="not empty"):
        run(tmp_path, "out")
    with pytest.raises(DedupInputError, match="overwrite the input"):
        run_dedup(DedupConfig(inputs=[str(tmp_path / "in/**/*.jsonl*")], output=str(tmp_path / "in"),
                              progress=False, overwrite=True))


def test_min_length_counts_normalised_characters(tmp_path):
    # 199 letters plus punctuation and whitespace: under 200 after normalisation.
    under = "a" * 100 + " ,,, \n\n " + "b" * 98
    over = "a" * 100 + " " + "b" * 99
    assert len(under) > 200 and len(over) == 200
    write_shard(tmp_path / "in" / "x.jsonl", [rec(under), rec(over)])
    stats, out = run(tmp_path, "out")
    assert stats["total"]["short"]["documents"] == 1
    assert read_shard(out / "x.jsonl") == [rec(over)]


def test_decontamination_against_holdout(tmp_path):
    rng = random.Random(2)
    leaked, clean = random_text(rng, 400), random_text(rng, 400)
    write_shard(tmp_path / "in" / "train.jsonl", [rec(clean), rec(leaked.upper() + " !")])
    write_shard(tmp_path / "holdout" / "val.jsonl.zst", [rec(leaked), rec(random_text(rng, 400))])
    stats, out = run(tmp_path, "out", holdout=[str(tmp_path / "holdout" / "*.zst")])
    assert stats["total"]["contaminated"]["documents"] == 1
    assert read_shard(out / "train.jsonl") == [rec(clean)]
    assert stats["holdout"]["unique_digests"] == 2


BAD_LINES = {
    "invalid_json": b'{"text": "unterminated',
    "missing_text": json.dumps({"meta": {"redpajama_set_name": "RedPajamaC4"}}).encode(),
    "empty_text": json.dumps(rec("")).encode(),
    "non_utf8": b'{"text": "caf\xe9 ' + b"x" * 300 + b'"}',
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_input_fail_names_file_and_line(tmp_path, reason):
    rng = random.Random(1)
    write_shard(tmp_path / "in" / "a.jsonl", [rec(random_text(rng, 300)), BAD_LINES[reason]])
    with pytest.raises(DedupInputError, match=r"a\.jsonl:2: .*--on-bad-input skip"):
        run(tmp_path, "out")


def test_bad_input_skip_counts_every_line(tmp_path):
    rng = random.Random(1)
    good = [random_text(rng, 300) for _ in range(3)]
    lines = [rec(good[0])] + [BAD_LINES[r] for r in sorted(BAD_LINES)] + [rec(good[1]), b"", rec(good[2])]
    write_shard(tmp_path / "in" / "a.jsonl.zst", lines)
    stats, out = run(tmp_path, "out", on_bad_input="skip")
    bad = stats["total"]["bad_input"]
    assert bad["documents"] == 5
    assert bad["by_reason"] == {"invalid_json": 2, "missing_text": 1, "empty_text": 1, "non_utf8": 1}
    assert stats["total"]["input"]["documents"] == 8
    assert stats["total"]["kept"]["documents"] == 3
    assert [r["text"] for r in read_shard(out / "a.jsonl.zst")] == good
    listed = [json.loads(x) for x in open(out / "bad_input.jsonl")]
    assert [(d["line"], d["reason"]) for d in listed] == [
        (2, "empty_text"), (3, "invalid_json"), (4, "missing_text"), (5, "non_utf8"), (7, "invalid_json")]
    assert all(d["file"].endswith("a.jsonl.zst") for d in listed)


def test_config_errors_name_the_flag(tmp_path):
    write_shard(tmp_path / "in" / "a.jsonl", [rec("x" * 300)])
    with pytest.raises(DedupInputError, match="--bands/--rows.*--num-perm"):
        run(tmp_path, "o1", bands=10, rows=13)
    with pytest.raises(DedupInputError, match="--threshold"):
        run(tmp_path, "o2", threshold=1.5)
    with pytest.raises(DedupInputError, match="--input .*matches no files"):
        run(tmp_path, "o3", inputs=[str(tmp_path / "nope" / "*.jsonl")])
    with pytest.raises(DedupInputError, match="--mode"):
        run(tmp_path, "o4", mode="both")
    open(tmp_path / "in" / "notes.txt", "w").close()
    with pytest.raises(DedupInputError, match="notes.txt: unsupported file type"):
        run(tmp_path, "o5", inputs=[str(tmp_path / "in" / "*")])


def test_threshold_and_word_ngrams(tmp_path):
    rng = random.Random(4)
    words = random_text(rng, 2000).split()
    a = " ".join(words[:120])
    b = " ".join(words[:110] + words[200:210])  # word 3-gram Jaccard about 0.8
    write_shard(tmp_path / "in" / "a.jsonl", [rec(a), rec(b), rec(random_text(rng, 600))])
    stats, _ = run(tmp_path, "out", ngram_unit="word", ngram=3, threshold=0.5)
    lsh = pytest.importorskip("datasketch.lsh")
    assert (stats["lsh"]["bands"], stats["lsh"]["rows"]) == lsh._optimal_param(0.5, 128, 0.5, 0.5)
    assert stats["total"]["duplicates"]["documents"] == 1


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    rng = random.Random(8)
    _cross_source_corpus(tmp_path, rng)
    write_shard(tmp_path / "bad" / "z.jsonl", [rec(random_text(rng, 300)), b"{oops"])
    cmd = [sys.executable, "-m", "btlm_jax.data.dedup", "--quiet"]
    res = subprocess.run(cmd + ["--input", str(tmp_path / "in/**/*.jsonl*"), "--output",
                                str(tmp_path / "out"), "--mode", "local"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["duplicates"] == 1 and summary["kept"] == 5
    res = subprocess.run(cmd + ["--input", str(tmp_path / "bad/*.jsonl"), "--output", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "z.jsonl:2: invalid JSON" in res.stderr and "Traceback" not in res.stderr
