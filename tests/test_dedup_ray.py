"""The Ray engine (and the multi-process local engine) give byte-identical output."""

import json
import os
import random

import pytest
import zstandard

from btlm_jax.data.dedup import DedupConfig, DedupInputError, run_dedup


def _corpus(root, rng):
    texts = [" ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8)))
                      for _ in range(80)) for _ in range(40)]
    sources = ["RedPajamaC4", "RedPajamaGithub", "RedPajamaArXiv"]
    for f in range(6):
        lines = []
        for i in range(30):
            t = rng.choice(texts)
            if rng.random() < 0.5:  # near duplicate: edit a few characters
                k = rng.randrange(len(t) - 5)
                t = t[:k] + "zz" + t[k + 2:]
            lines.append(json.dumps({"text": t, "meta": {"redpajama_set_name": rng.choice(sources)}}))
        lines.append('{"broken')
        data = ("\n".join(lines) + "\n").encode()
        name = f"chunk{f % 2}/example_train_{f}.jsonl"
        if f % 3 == 0:
            name += ".zst"
            data = zstandard.ZstdCompressor().compress(data)
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(data)


def _files(out):
    result = {}
    for dirpath, _, names in os.walk(out):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as fh:
                data = fh.read()
            if n == "stats.json":
                data = json.loads(data)
                del data["run"]
            result[os.path.relpath(p, out)] = data
    return result


@pytest.mark.slow
def test_ray_and_process_pool_match_local(tmp_path):
    ray = pytest.importorskip("ray")
    _corpus(str(tmp_path / "in"), random.Random(11))
    expected = {}
    for mode in ("global", "local"):
        common = dict(inputs=[str(tmp_path / "in/**/*.jsonl*")], mode=mode, on_bad_input="skip",
                      progress=False, partitions=3)
        ref = run_dedup(DedupConfig(output=str(tmp_path / f"local_{mode}"), **common))
        assert ref["total"]["duplicates"]["documents"] > 20  # the corpus has real work in it
        assert ref["total"]["bad_input"]["documents"] == 6
        expected[mode] = _files(tmp_path / f"local_{mode}")
        run_dedup(DedupConfig(output=str(tmp_path / f"pool_{mode}"), workers=2, **common))
        assert _files(tmp_path / f"pool_{mode}") == expected[mode]
    with pytest.raises(DedupInputError, match=r"example_train_\d+\.jsonl(\.zst)?:31: invalid JSON"):
        run_dedup(DedupConfig(output=str(tmp_path / "pool_fail"), workers=2,
                              inputs=[str(tmp_path / "in/**/*.jsonl*")], progress=False))
    assert expected["global"] != expected["local"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for mode in ("global", "local"):
            run_dedup(DedupConfig(output=str(tmp_path / f"ray_{mode}"), engine="ray", mode=mode,
                                  inputs=[str(tmp_path / "in/**/*.jsonl*")], on_bad_input="skip",
                                  progress=False, partitions=3))
            assert _files(tmp_path / f"ray_{mode}") == expected[mode]
        # A bad line inside a Ray task surfaces as the same clear error, naming file and line
        # (every file ends with a broken line; which task fails first depends on scheduling).
        with pytest.raises(DedupInputError, match=r"example_train_\d+\.jsonl(\.zst)?:31: invalid JSON"):
            run_dedup(DedupConfig(output=str(tmp_path / "ray_fail"), engine="ray",
                                  inputs=[str(tmp_path / "in/**/*.jsonl*")], progress=False))
    finally:
        ray.shutdown()
