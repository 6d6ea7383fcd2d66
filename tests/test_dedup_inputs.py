"""Dedup on unlucky inputs: truncated or multi-frame .jsonl.zst shards, an empty corpus, a failed
run's scratch directory, and the command line's one-line errors."""

import json
import os
import random
import subprocess
import sys

import pytest
import zstandard

from btlm_jax.data.dedup import DedupConfig, DedupInputError, run_dedup
from btlm_jax.data.dedup import io as dio


def _rec(i, rng):
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(60)]
    return {"text": f"doc {i} " + " ".join(words), "meta": {"redpajama_set_name": "RedPajamaC4"}}


def _payload(n=40, seed=0):
    rng = random.Random(seed)
    return b"".join(json.dumps(_rec(i, rng)).encode() + b"\n" for i in range(n))


def _run(tmp_path, name, inputs, **kw):
    cfg = DedupConfig(inputs=inputs, output=str(tmp_path / name), progress=False, **kw)
    return run_dedup(cfg), tmp_path / name


def _cli(*args):
    cmd = [sys.executable, "-m", "btlm_jax.data.dedup", "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _cut_points(n_bytes, k=10, seed=21):
    """``k`` distinct seeded cut points strictly inside the file, plus the two ends of the
    frame (just after the header, one byte short of the end)."""
    rng = random.Random(seed)
    return sorted({1, 6, n_bytes - 1} | set(rng.sample(range(2, n_bytes - 1), k)))


def test_truncated_zst_is_an_error_at_every_cut_point(tmp_path):
    whole = zstandard.ZstdCompressor(level=3).compress(_payload())
    good = tmp_path / "in" / "a.jsonl.zst"
    good.parent.mkdir()
    good.write_bytes(zstandard.ZstdCompressor().compress(_payload(seed=1)))
    bad = tmp_path / "in" / "b.jsonl.zst"
    for j, cut in enumerate(_cut_points(len(whole))):
        bad.write_bytes(whole[:cut])
        for mode in ("fail", "skip"):
            with pytest.raises(DedupInputError) as err:
                _run(tmp_path, f"o{j}{mode}", [str(tmp_path / "in" / "*.zst")], on_bad_input=mode)
            msg = str(err.value)
            assert "\n" not in msg
            assert str(bad) in msg and "truncated" in msg, (cut, mode, msg)
            assert not (tmp_path / f"o{j}{mode}" / "b.jsonl.zst").exists()


def test_one_reader_for_dedup_and_training(tmp_path):
    """The dedup reader and the training reader see the same lines (CRLF, blank line,
    unterminated last line, several zstd frames) and reject the same truncated stream."""
    from btlm_jax.data import slimpajama

    lines = [b'{"text": "a"}\r', b"", b'{"text": "b"}', b'{"text": "c"}']
    raw = b"\n".join(lines)  # no final newline
    p = tmp_path / "m.jsonl.zst"
    c = zstandard.ZstdCompressor()
    p.write_bytes(c.compress(raw[:7]) + c.compress(raw[7:20]) + c.compress(raw[20:]))
    expected = [(1, b'{"text": "a"}'), (2, b""), (3, b'{"text": "b"}'), (4, b'{"text": "c"}')]
    assert list(dio.iter_raw_lines(str(p))) == expected
    assert [(n, line.rstrip(b"\r")) for n, line in slimpajama.iter_lines(str(p))] == expected
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(DedupInputError, match="truncated"):
        list(dio.iter_raw_lines(str(p)))
    with pytest.raises(slimpajama.DataError, match="truncated"):
        list(slimpajama.iter_lines(str(p)))


def test_multiframe_zst_is_read_whole(tmp_path):
    """A shard of several zstd frames (as written by pzstd or a seekable writer) is deduplicated
    whole, not just its first frame."""
    data = _payload(30)
    lines = data.splitlines(keepends=True)
    c = zstandard.ZstdCompressor()
    p = tmp_path / "in" / "a.jsonl.zst"
    p.parent.mkdir()
    p.write_bytes(b"".join(c.compress(b"".join(lines[i:i + 7])) for i in range(0, 30, 7)))
    stats, out = _run(tmp_path, "out", [str(p)], min_length=10)
    assert stats["total"]["input"]["documents"] == 30
    assert stats["total"]["kept"]["documents"] == 30
    kept = zstandard.ZstdDecompressor().decompressobj().decompress((out / "a.jsonl.zst").read_bytes())
    assert kept == data


@pytest.mark.parametrize("content", [b"", b"\n\n"], ids=["empty-file", "blank-lines"])
def test_empty_input_is_an_error(tmp_path, content):
    p = tmp_path / "in" / "a.jsonl"
    p.parent.mkdir()
    p.write_bytes(content)
    with pytest.raises(DedupInputError, match=r"--input .*no documents"):
        _run(tmp_path, "out", [str(p)], on_bad_input="skip")
    res = _cli("--input", str(p), "--output", str(tmp_path / "o2"))
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1, res.stderr


def test_failed_run_removes_its_scratch_directory(tmp_path):
    rng = random.Random(3)
    p = tmp_path / "in" / "a.jsonl"
    p.parent.mkdir()
    p.write_bytes(json.dumps(_rec(0, rng)).encode() + b"\n{oops\n")
    with pytest.raises(DedupInputError, match="a.jsonl:2"):
        _run(tmp_path, "out", [str(p)])
    assert not (tmp_path / "out").exists()  # created by the failed run: scratch and all removed
    p.write_bytes(json.dumps(_rec(0, rng)).encode() + b"\n")  # fixed: the rerun is not refused
    stats, _ = _run(tmp_path, "out", [str(p)], min_length=10)
    assert stats["total"]["kept"]["documents"] == 1


def test_refusal_names_a_leftover_scratch_directory(tmp_path):
    rng = random.Random(3)
    p = tmp_path / "in" / "a.jsonl"
    p.parent.mkdir()
    p.write_bytes(json.dumps(_rec(0, rng)).encode() + b"\n")
    (tmp_path / "out" / ".dedup_work" / "hash").mkdir(parents=True)  # e.g. a killed run
    with pytest.raises(DedupInputError, match=r"\.dedup_work.*(remove|--overwrite)"):
        _run(tmp_path, "out", [str(p)])


@pytest.mark.parametrize("case", ["truncated", "missing-input", "bad-flag", "output-is-file"])
def test_cli_user_errors_are_one_line(tmp_path, case):
    p = tmp_path / "in" / "a.jsonl.zst"
    p.parent.mkdir()
    p.write_bytes(zstandard.ZstdCompressor().compress(_payload(5))[:-4])
    args = ["--input", str(p), "--output", str(tmp_path / "out")]
    if case == "missing-input":
        args[1] = str(tmp_path / "nope" / "*.jsonl")
    elif case == "bad-flag":
        args += ["--bands", "x"]
    elif case == "output-is-file":
        (tmp_path / "out").write_text("")
    res = _cli(*args)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1, res.stderr
    if case == "truncated":
        assert str(p) in res.stderr and "truncated" in res.stderr
