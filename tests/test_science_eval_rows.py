"""make_eval_batches(contiguous=True): long evaluation rows never read across a document
boundary (the long-context evaluation of the ALiBi experiment)."""

import json

import numpy as np
import pytest

from btlm_jax.config import default_config
from btlm_jax.data import pipeline, tokenizer
from btlm_jax.data.slimpajama import DataError

BYTES = tokenizer.Tokenizer.from_file("bytes")


def _cfg(tmp_path, lengths):
    rng = np.random.default_rng(0)
    path = tmp_path / "eval.jsonl"
    docs = ["".join(rng.choice(list("abcdefgh ")) for _ in range(n)) for n in lengths]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = default_config()
    cfg.data.train = cfg.data.eval = str(path)
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.tokenizer = "bytes"
    return cfg, docs


def test_contiguous_rows_lie_inside_one_document(tmp_path):
    cfg, docs = _cfg(tmp_path, [50, 700, 90, 1300, 60])
    L = 256
    plain = pipeline.make_eval_batches(cfg, BYTES, seq_len=L, batch_size=2, num_batches=4)
    crossing = sum(int(np.any(b["inputs"][:, 1:] == BYTES.eos_id)) for b in plain)
    assert crossing > 0  # the packed stream's rows do cross documents
    got = pipeline.make_eval_batches(cfg, BYTES, seq_len=L, batch_size=2, num_batches=4,
                                     contiguous=True)
    long_docs = [d.encode() for d in docs if len(d) >= L]
    for b in got:
        for row in b["inputs"]:
            assert not np.any(row[1:] == BYTES.eos_id)
            text = bytes(int(x) for x in row[1:] if x < 256)
            assert any(text in d for d in long_docs)  # a contiguous piece of one document
    with pytest.raises(DataError, match="no document is 2048 tokens long"):
        pipeline.make_eval_batches(cfg, BYTES, seq_len=2048, batch_size=1, num_batches=1,
                                   contiguous=True)
