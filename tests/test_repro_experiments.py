"""Each reproduction command runs its --smoke grid end to end (real training of a few steps on the
embedded corpus), writes results.jsonl and its PNG figures, and a notebook executes on the smoke
results. The smoke runs are shared by the tests of one experiment (module-scoped fixtures). Every
run is a cell of configs/experiments/NAME.py: its task.json holds the plain main command."""

import importlib
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _smoke(tmp_path_factory, name: str, workers: int = 0, extra=()) -> pathlib.Path:
    out = tmp_path_factory.mktemp(f"repro_{name}")
    mod = importlib.import_module(f"experiments.{name}")
    assert mod.main(["--smoke", "--out", str(out), "--workers", str(workers), *extra]) == 0
    for task in (out / "runs").glob("*/task.json"):
        cmd = json.loads(task.read_text())["command"]
        assert cmd[1:4] == ["-m", "btlm_jax.main",
                            f"--config={ROOT / 'configs' / 'experiments' / name}.py:smoke"]
        assert cmd[-1] == f"--workdir={task.parent}"
    return out


def _check_outputs(out: pathlib.Path, n_runs: int, figures: list[str]) -> list[dict]:
    results = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == n_runs
    for r in results:
        assert r["status"] == "ok" and r["steps"] > 0 and r["num_params"] > 0
        assert 0 < r["final"]["eval_loss"] < 20
    for f in figures:
        data = (out / "figures" / f).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, f
    assert json.loads((out / "summary.json").read_text())["smoke"] is True
    return results


@pytest.fixture(scope="module")
def d2z_out(tmp_path_factory):
    return _smoke(tmp_path_factory, "d2z", workers=2)  # the subprocess path of the sweep runner


@pytest.mark.slow
def test_d2z_smoke_writes_results_and_figures(d2z_out):
    results = _check_outputs(d2z_out, 4, ["d2z_loss_vs_lr.png", "d2z_margin_vs_tpp.png",
                                          "d2z_ct_curves.png"])
    assert {(r["meta"]["schedule"], r["meta"]["seed"]) for r in results} == {
        (s, k) for s in ("d2z", "linear_10x") for k in (0, 1)}
    assert {r["overrides"]["seed"] for r in results} == {0, 1}
    summary = json.loads((d2z_out / "summary.json").read_text())
    assert summary["claim"] in ("holds", "does not hold", "inconclusive")
    curves = [json.loads(ln) for ln in (d2z_out / "ct_curves.jsonl").read_text().splitlines()]
    for c in curves:  # the EMA coefficients of a run sum to one
        assert len(c["c"]) == c["steps"] + 1 and abs(sum(c["c"]) - 1) < 1e-9
    # rerunning skips every finished run and regathers the same results
    from experiments import d2z

    assert d2z.main(["--smoke", "--out", str(d2z_out), "--workers", "0"]) == 0
    again = [json.loads(ln) for ln in (d2z_out / "results.jsonl").read_text().splitlines()]
    assert again == results


@pytest.mark.slow
def test_d2z_notebook_executes_on_smoke_results(d2z_out, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("BTLM_REPRO_DIR", str(d2z_out))
    monkeypatch.setenv("BTLM_FIGURES_DIR", str(tmp_path))
    nb = nbformat.read(ROOT / "notebooks" / "repro_d2z.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "4 runs read from" in text and "VERDICT: claim 1" in text and "SMOKE" in text
    for f in ("repro_d2z_loss_vs_lr.png", "repro_d2z_margin_vs_tpp.png", "repro_d2z_ct_curves.png"):
        assert (tmp_path / f).read_bytes()[:8] == PNG


@pytest.mark.slow
def test_alibi_pi_smoke_evaluates_lm_loss_and_retrieval_with_and_without_pi(tmp_path_factory):
    out = _smoke(tmp_path_factory, "alibi_pi")
    results = _check_outputs(out, 2, ["alibi_loss_vs_length.png", "alibi_retrieval.png",
                                      "alibi_per_position.png"])
    assert {r["meta"]["seed"] for r in results} == {0, 1}
    r = results[0]
    # passkey documents are half of the training rows
    assert r["overrides"]["data.mixture"] == "text=0.5,passkey=0.5"
    evals = r["post"]["evals"]
    assert sorted((e["length"], e["position_interpolation"]) for e in evals) == [
        (L, pi) for L in (64, 128, 256, 512) for pi in (False, True)]
    for e in evals:
        assert len(e["position_loss"]) == e["length"]
        assert e["pi_scale"] == (e["length"] / 64 if e["position_interpolation"] else 1.0)
    st = r["post"]["strength"]
    assert [x["alpha"] for x in st] == [0.0, 0.25, 0.5, 0.75, 1.0]
    at = {e["position_interpolation"]: e["loss"] for e in evals if e["length"] == 512}
    assert st[0]["loss"] == pytest.approx(at[False], abs=1e-5)
    assert st[-1]["loss"] == pytest.approx(at[True], abs=1e-5)
    ret = r["post"]["retrieval"]
    assert {(x["length"], x["alpha"]) for x in ret} == {
        (L, a) for L in (64, 128, 256, 512) for a in (0.0, 0.25, 0.5, 0.75, 1.0)}
    for x in ret:
        assert 0 <= x["accuracy"] <= 1 and x["key_beyond_train_len"] == (x["length"] > 64)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lm_claim"] in ("holds", "does not hold", "inconclusive")


@pytest.mark.slow
def test_mup_smoke(tmp_path_factory):
    # a --config.KEY=VALUE option is set in every run, typed as main types it
    out = _smoke(tmp_path_factory, "mup", extra=["--config.optim.weight_decay=0.25"])
    results = _check_outputs(out, 4, ["mup_lr_transfer.png", "mup_coord_check.png"])
    assert {r["meta"]["param"] for r in results} == {"mup", "sp"}
    assert {r["overrides"]["model.n_heads"] for r in results} == {4}  # fixed across widths
    assert {r["overrides"]["model.mup.enabled"] for r in results} == {True, False}
    assert {r["overrides"]["optim.weight_decay"] for r in results} == {0.25}
    # the coordinate check beside the sweep, at the sweep's widths
    cc = json.loads((out / "summary.json").read_text())["coord_check"]
    assert cc["widths"] == [16, 32] and set(cc["slopes_last_step"]) == {"mup", "sp"}
    assert json.loads((out / "coord_check.json").read_text())["widths"] == [16, 32]


@pytest.mark.slow
def test_dedup_smoke_global_removes_more_than_local(tmp_path_factory):
    out = _smoke(tmp_path_factory, "dedup")
    _check_outputs(out, 2, ["dedup_removal.png", "dedup_val_loss.png"])
    summary = json.loads((out / "summary.json").read_text())
    rem = summary["removal"]
    assert rem["global"]["all"]["documents"] > rem["local"]["all"]["documents"] > 0
    assert summary["global_removes_at_least_local_everywhere"] is True


def test_alibi_pi_rejects_a_too_short_training_length(tmp_path, capsys):
    from experiments import alibi_pi

    assert alibi_pi.main(["--train-len", "4", "--out", str(tmp_path)]) == 2
    assert "--train-len=4" in capsys.readouterr().err


def test_bad_options_are_named_before_anything_runs(tmp_path, capsys):
    from experiments import d2z

    assert d2z.main(["--lrs", "1e-3,x", "--out", str(tmp_path)]) == 2
    assert "--lrs='1e-3,x': 'x' is not a number" in capsys.readouterr().err
    assert d2z.main(["--smoke", "--config.optim.peak_rl=1", "--out", str(tmp_path)]) == 2
    assert "--config.optim.peak_rl" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_alibi_pi_holds_out_long_texts_from_a_single_text_file(tmp_path):
    # --data=one .txt (like tinyshakespeare): the runner's own split cuts it into ~4000-character
    # chunks; the long-context hold-out must re-split the original text, or no held-out document
    # is long enough for a row of the longest evaluation length (the bug: "no document of 8192
    # characters to hold out")
    import random
    import types

    from btlm_jax.experiments import data as exp_data
    from experiments import alibi_pi

    rng = random.Random(0)
    words = ["the", "king", "shall", "speak", "now", "and", "we", "will", "hear", "him", "my",
             "lord", "good", "night", "sweet", "prince", "what", "say", "you"]
    paras = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) for _ in range(3000)]
    txt = tmp_path / "play.txt"
    txt.write_text("\n\n".join(paras))
    out = tmp_path / "out"
    data = exp_data.prepare_data(str(txt), out)
    longest = 1024
    res = alibi_pi.prepare(types.SimpleNamespace(data=str(txt)), out, data, train_len=128,
                           longest=longest, passkey_frac=0.25, vocab=512, passkey_docs=8)
    held = [json.loads(ln)["text"] for ln in
            (out / "long_context" / "eval.jsonl").read_text().splitlines()]
    assert held and all(len(t) >= 8 * longest for t in held)
    assert res["info"]["held_out_docs"] == len(held)
    # every held-out text is a contiguous stretch of the file, kept out of training
    src = txt.read_text()
    assert all(t in src for t in held)
    train = (out / "long_context" / "train.jsonl").read_text()
    assert not any(json.dumps(t, ensure_ascii=False)[1:-1] in train for t in held)


def _alibi_run(seed, acc, n=64, train_len=128, lengths=(128, 256, 512)):
    """An experiments.alibi_pi result line with passkey accuracies {(length, alpha): accuracy}."""
    evals = [{"length": L, "position_interpolation": pi, "loss": 3.0 + 0.1 * pi + 0.01 * seed}
             for L in lengths for pi in (False, True)]
    ret = [{"length": L, "alpha": a, "accuracy": acc.get((L, a), 0.0), "n": n}
           for L in lengths for a in (0.0, 1.0)]
    return {"name": f"model=m,seed={seed}", "status": "ok",
            "meta": {"model": "m", "seed": seed, "train_len": train_len, "d_model": 64,
                     "n_layers": 2},
            "post": {"evals": evals, "retrieval": ret, "strength": []}}


def test_alibi_retrieval_verdict_rules_out_a_gain_when_every_seed_scores_zero():
    # learned at L_train (0.6), 0 of 64 beyond it with PI on and off at every seed: the t-interval
    # over seeds is [0, 0] and read "inconclusive" before; 0 of 192 bounds PI's accuracy by
    # 1 - 0.025**(1/192) = 0.019 (exact binomial), so a gain of 0.1 is ruled out: does not hold
    from btlm_jax.experiments import stats
    from experiments import alibi_pi

    lo, hi = stats.clopper_pearson(0, 192)
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** (1 / 192), rel=1e-9)
    lo, hi = stats.clopper_pearson(20, 20)
    assert hi == 1 and lo == pytest.approx(0.025 ** (1 / 20), rel=1e-9)

    learned = {(128, 0.0): 0.6, (128, 1.0): 0.6}
    s = alibi_pi.summarize([_alibi_run(i, learned) for i in range(3)])
    m = s["models"][0]
    assert m["retrieval"]["256"]["pi_gain"]["hi_binomial"] == pytest.approx(
        1 - 0.025 ** (1 / 192), rel=1e-6)
    assert m["pi_higher_retrieval_beyond"] == "does not hold"
    assert s["retrieval_claim"] == "does not hold"

    # PI retrieves beyond L_train at every seed: holds
    runs = [_alibi_run(i, {**learned, (256, 1.0): 0.45 + 0.05 * i, (512, 1.0): 0.4 + 0.05 * i})
            for i in range(3)]
    assert alibi_pi.summarize(runs)["retrieval_claim"] == "holds"

    # a small noisy gain on few examples: neither established nor ruled out
    runs = [_alibi_run(i, {**learned, (256, 1.0): [0.0625, 0.0, 0.0625][i]}, n=16)
            for i in range(3)]
    assert alibi_pi.summarize(runs)["models"][0]["retrieval"]["256"]["pi_higher"] == "inconclusive"

    # not learned at L_train: nothing to extrapolate, whatever happens beyond
    s = alibi_pi.summarize([_alibi_run(i, {}) for i in range(3)])
    assert s["retrieval_claim"] == "inconclusive"


def test_d2z_report_says_a_slope_needs_two_sizes():
    """One TPP value (as the smoke grid runs): the report says why there is no slope instead of
    printing `slope +nan`; two sizes with one seed each: a slope without an interval."""
    from experiments import d2z

    def results(tpps, seeds):
        return [{"name": f"{t}-{s}-{lr}-{k}", "status": "ok", "final": {"eval_loss": loss},
                 "meta": {"tpp": t, "schedule": s, "peak_lr": lr, "seed": k}}
                for t in tpps for s in ("d2z", "linear_10x") for lr in (1e-3, 1e-2)
                for k in seeds
                for loss in [4.0 + 0.1 * (s == "linear_10x") + lr + 0.01 * k - 0.05 * t]]

    text = d2z.report(d2z.summarize(results([8.0], [0, 1])))
    line = next(ln for ln in text.splitlines() if "vs ln(TPP)" in ln)
    assert "nan" not in text and "no slope" in line and "two or more TPP values" in line, line
    assert "this grid has 1: 8" in line and line.endswith("margin grows with TPP: inconclusive")
    text = d2z.report(d2z.summarize(results([2.0, 8.0], [0])))
    line = next(ln for ln in text.splitlines() if "vs ln(TPP)" in ln)
    assert "nan" not in line and "no interval" in line and "from 2 points" in line, line
