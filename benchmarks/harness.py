"""Harness throughput: requests/s of a multiple-choice task, batched vs one request at a time.

    python benchmarks/harness.py                          # tiny preset, 48 docs x 4 choices
    python benchmarks/harness.py --docs=96 --batch_sizes=1,8,32 --json

The ``tiny`` preset (configs/btlm.py: d_model 256, 4 layers, vocab 4096) at random
initialisation with the byte tokenizer scores a local multiple-choice task written to a temporary
directory (``dataset_path: json``; contexts of 60-400 bytes, so the requests fall into several
length buckets). For each batch size, one warm-up ``lm_eval.simple_evaluate`` pass compiles the
bucket shapes; the next pass is timed: wall time of the whole evaluation (lm_eval's request
building and metric aggregation included) and requests/s = loglikelihood requests / that time.
``--json`` prints one JSON list as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which "
         "this be or had not but what all when there can one their has been would who more will "
         "river stone light market winter garden engine story paper mountain").split()


def write_task(d: Path, docs: int, choices: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(docs):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 80)))[:400]
        ch = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(choices)]
        rows.append({"question": q + " Answer:", "choices": ch, "label": rng.randrange(choices)})
    (d / "bench_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'bench_mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: label\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--batch_sizes", default="1,16")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import logging

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from configs.btlm import get_config

    from btlm_jax.data.tokenizer import Tokenizer
    from btlm_jax.harness import BTLMEvalLM, evaluate
    from btlm_jax.models.btlm import BTLM

    cfg = get_config(a.preset)
    model = BTLM(cfg.model)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                          jnp.zeros((1, 8), jnp.int32))["params"])

    class Handle:
        pass

    h = Handle()
    h.cfg, h.model, h.params, h.tokenizer = cfg, model, params, Tokenizer("bytes")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_task(Path(tmp), a.docs, a.choices)
        n_req = a.docs * a.choices
        for bs in (int(x) for x in a.batch_sizes.split(",")):
            lm = BTLMEvalLM(h, batch_size=bs, progress=False)
            t0 = time.perf_counter()
            evaluate(lm, "bench_mc", include_path=tmp, bootstrap_iters=0)  # compiles the buckets
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = evaluate(lm, "bench_mc", include_path=tmp, bootstrap_iters=0)
            dt = time.perf_counter() - t0
            rows.append({"preset": a.preset, "batch_size": bs, "requests": n_req,
                         "shapes": sorted(s[2] for s in lm.compiled_shapes),
                         "first_pass_s": round(warm, 2), "seconds": round(dt, 2),
                         "requests_per_s": round(n_req / dt, 1),
                         "acc": res["results"]["bench_mc"]["acc,none"]})
    print(f"{'batch':>6} {'requests':>9} {'first pass s':>13} {'timed s':>8} {'req/s':>8}  "
          "padded lengths")
    for r in rows:
        print(f"{r['batch_size']:>6} {r['requests']:>9} {r['first_pass_s']:>13} "
              f"{r['seconds']:>8} {r['requests_per_s']:>8}  {r['shapes']}")
    base = rows[0]["requests_per_s"]
    for r in rows[1:]:
        print(f"batch {r['batch_size']} vs {rows[0]['batch_size']}: "
              f"{r['requests_per_s'] / base:.2f}x requests/s")
    if a.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
