"""lm-evaluation-harness integration (btlm_jax.harness) on local tasks, without the network.

The tasks are JSON-lines files and task YAMLs (``dataset_path: json`` with local ``data_files``)
written here. Every logged log-likelihood is compared with a brute-force reference written below:
the context/continuation split done by hand, one unpadded full forward pass per request, float64
log-softmax in NumPy. Rolling log-likelihoods are compared with the sum over windows cut by hand,
and generations with greedy decoding by repeated full forward passes, stopped at the stop string.
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("lm_eval")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from btlm_jax.config import default_config  # noqa: E402
from btlm_jax.models.btlm import BTLM  # noqa: E402
from tests.helpers import xla_flags  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
L = 48  # the model's length: some contexts below are longer and get left-truncated
MAX_GEN = 10


class CharTokenizer:
    """One id per printable ASCII character and newline; end-of-text is the last id."""

    chars = [chr(i) for i in range(32, 127)] + ["\n"]

    def __init__(self):
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.eos_id = len(self.chars)
        self.name = "chars"

    def encode(self, text):
        return [self.index[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i < len(self.chars))


def make_handle(seed=0, dynamic_len=0):
    cfg = default_config()
    m = cfg.model
    m.alibi_scaling_train_seq_len = dynamic_len  # HF btlm's dynamic alibi_scaling
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 128, 64, 2, 4, 128, L
    m.mup.enabled, m.init_std = False, 0.2  # standard parametrisation, peaky enough logits
    model = BTLM(m)
    init = jax.jit(model.init)
    params = nn.unbox(init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    # the reference's own forward: one sequence, whole logits, no segment ids, the slopes divided
    # by an explicit scale (computed in ref_logprobs) on a model without the dynamic scaling
    plain = m.copy_and_resolve_references()
    plain.alibi_scaling_train_seq_len = 0
    ref_model = BTLM(plain)
    fwd = jax.jit(lambda p, x, s: ref_model.apply({"params": p}, x, alibi_scale=s))
    return SimpleNamespace(cfg=cfg, model=model, params=params, tokenizer=CharTokenizer(),
                           ref_forward=fwd)


@pytest.fixture(scope="module")
def handle():
    return make_handle()


# ----- the independent reference --------------------------------------------------------------

def ref_logprobs(h, ids):
    """float64 log-softmax of one full forward pass over ``ids`` ([len, V]). The sequence is
    filled up to L with token 0 after its end so one compiled shape serves every call: the
    model is causal, so the logits at the real positions are those of ``ids`` alone. A dynamic
    alibi_scaling (HF btlm: slopes / (n / T) for n > T keys) is applied here from ``len(ids)``."""
    assert 0 < len(ids) <= L
    dyn = h.cfg.model.alibi_scaling_train_seq_len
    scale = max(1.0, len(ids) / dyn) if dyn else 1.0
    x = jnp.asarray([list(ids) + [0] * (L - len(ids))], jnp.int32)
    logits = h.ref_forward(h.params, x, jnp.float32(scale))[0, :len(ids)]
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ref_split(tok, context, continuation):
    """lm_eval's documented split: trailing context spaces go to the continuation; the pair is
    encoded whole and cut at the context's length; an empty context is end-of-text."""
    if context == "":
        return [tok.eos_id], tok.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


def ref_loglikelihood(h, ctx, cont):
    seq = (ctx + cont)[-(L + 1):]
    inp, tgt = seq[:-1], seq[1:]
    lp = ref_logprobs(h, inp)
    rows = range(len(inp) - len(cont), len(inp))
    ll = sum(lp[r, tgt[r]] for r in rows)
    greedy = all(int(np.argmax(lp[r])) == tgt[r] for r in rows)
    return ll, greedy


def ref_rolling(h, text):
    """Sum over windows: window k predicts tokens [kL, min((k+1)L, n)) of the text from the L
    tokens before its last target (the first window from end-of-text + the text)."""
    toks = h.tokenizer.encode(text)
    full = [h.tokenizer.eos_id] + toks
    total, a = 0.0, 0
    while a < len(toks):
        b = min(a + L, len(toks))
        inp = full[max(0, b - L):b]
        lp = ref_logprobs(h, inp)
        for j in range(a, b):  # target toks[j] is predicted at input position j - (b - len(inp))
            total += lp[j - (b - len(inp)), toks[j]]
        a = b
    return total


def ref_greedy(h, context, until, max_gen=MAX_GEN):
    tok = h.tokenizer
    ids = (tok.encode(context) or [tok.eos_id])[-(L - max_gen):]
    gen = []
    for _ in range(max_gen):
        nxt = int(np.argmax(ref_logprobs(h, ids + gen)[-1]))
        if nxt == tok.eos_id:
            break
        gen.append(nxt)
        if any(s in tok.decode(gen) for s in until):
            break
    text = tok.decode(gen)
    for s in until:
        text = text.split(s)[0]
    return text


# ----- local tasks ----------------------------------------------------------------------------

MC_DOCS = [
    {"question": "Which is a fruit?", "choices": ["apple", "stone", "cloud"], "label": 0},
    {"question": "Sky colour: ", "choices": ["blue", "green"], "label": 0},
    {"question": "A very long question that will not fit in the context window of the tiny "
                 "model, so it is cut from the left. Answer:", "choices": ["yes", "no", "maybe"],
     "label": 2},
    {"question": "2 + 2 =", "choices": ["4", "22", "five"], "label": 0},
    {"question": "", "choices": ["empty context", "nothing"], "label": 1},
    {"question": "Pick b:", "choices": ["a", "b", "c", "d"], "label": 1},
]
ROLL_DOCS = [{"text": "short doc"},
             {"text": "A longer document that spans more than one window of the tiny model: "
                      "it has well over forty-eight characters, " * 2}]
GEN_DOCS = [{"prompt": "Once upon a time", "answer": " there"},
            {"prompt": "Q: name a colour.\nA:", "answer": " red"},
            {"prompt": "x" * 60, "answer": "y"}]


def write_task(d: Path, name: str, docs: list, body: str) -> None:
    data = d / f"{name}.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in docs))
    (d / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}")


def write_mc_task(d: Path, name: str = "local_mc") -> None:
    write_task(d, name, MC_DOCS,
               'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
               'doc_to_target: label\ndoc_to_choice: "{{choices}}"\n'
               "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def write_roll_task(d: Path) -> None:
    write_task(d, "local_roll", ROLL_DOCS,
               'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
               "metric_list:\n  - metric: word_perplexity\n")


def write_gen_task(d: Path, until: list) -> None:
    write_task(d, "local_gen", GEN_DOCS,
               'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
               'doc_to_target: "{{answer}}"\n'
               f"generation_kwargs:\n  until: {json.dumps(until)}\n  max_gen_toks: {MAX_GEN}\n"
               "  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
               "    higher_is_better: true\n")


def args_of(sample):
    """The request arguments of a logged sample (list of tuples in lm_eval 0.4.x)."""
    a = sample["arguments"]
    if isinstance(a, dict):  # newer layouts: {"gen_args_0": {"arg_0": ..., "arg_1": ...}}
        return [tuple(v[k] for k in sorted(v)) for _, v in sorted(a.items())]
    return [tuple(x) for x in a]


# ----- tests ----------------------------------------------------------------------------------

def test_bucket_length():
    from btlm_jax.harness import bucket_length

    got = [bucket_length(n, 48) for n in (1, 16, 17, 24, 25, 32, 33, 47, 48)]
    assert got == [16, 16, 24, 24, 32, 32, 48, 48, 48]
    assert [bucket_length(n, 4096) for n in (100, 129, 192, 193, 3000, 5000)] == [
        128, 192, 192, 256, 3072, 5000]
    # a task's lengths fall into a handful of buckets: at most two per octave
    assert len({bucket_length(n, 2048) for n in range(1, 2049)}) == 2 * 7 + 1


def _run_task(handle, task_dir, task, batch_size):
    """(model, results) of ``task`` (a local task in ``task_dir``) with logged samples."""
    from btlm_jax.harness import BTLMEvalLM, evaluate

    lm = BTLMEvalLM(handle, batch_size=batch_size, progress=False)
    return lm, evaluate(lm, task, include_path=str(task_dir), log_samples=True,
                        bootstrap_iters=0)


def test_multiple_choice_loglikelihoods_and_acc_match_brute_force(handle, tmp_path):
    write_mc_task(tmp_path)
    lm, res = _run_task(handle, tmp_path, "local_mc", batch_size=4)
    samples = res["samples"]["local_mc"]
    assert len(samples) == len(MC_DOCS)
    tok = handle.tokenizer
    accs = []
    for s in samples:
        doc = MC_DOCS[s["doc_id"]]
        args = args_of(s)
        assert [c for _, c in args] == [" " + c for c in doc["choices"]]
        refs = [ref_loglikelihood(handle, *ref_split(tok, ctx, cont)) for ctx, cont in args]
        got = [r[0] for r in s["resps"]]
        np.testing.assert_allclose([g[0] for g in got], [r[0] for r in refs], rtol=1e-4, atol=2e-3)
        assert [bool(g[1]) for g in got] == [r[1] for r in refs]
        acc = float(int(np.argmax([r[0] for r in refs])) == doc["label"])
        assert s["acc"] == acc
        accs.append(acc)
    assert res["results"]["local_mc"]["acc,none"] == pytest.approx(np.mean(accs))
    # the long question was truncated (its context alone exceeds the model's length)
    assert len(tok.encode(MC_DOCS[2]["question"])) > L
    # batches padded into power-of-two buckets: a couple of compiled shapes, not one per request
    lengths = {s[2] for s in lm.compiled_shapes if s[0] == "score"}
    assert lengths <= {16, 24, 32, 48} and all(s[1] == 4 for s in lm.compiled_shapes)
    if hasattr(lm._score_fn, "_cache_size"):
        assert lm._score_fn._cache_size() == len(lengths)


def test_one_request_at_a_time_batched_and_chunked_logits_equal_brute_force(handle, monkeypatch):
    from btlm_jax.harness import BTLMEvalLM
    from btlm_jax.harness import lm as lm_mod

    tok = handle.tokenizer
    pairs = [ref_split(tok, d["question"], " " + c) for d in MC_DOCS[:4] for c in d["choices"]]
    refs = [ref_loglikelihood(handle, *p) for p in pairs]
    a = BTLMEvalLM(handle, batch_size=1, progress=False).score_pairs(pairs)
    b = BTLMEvalLM(handle, batch_size=8, progress=False).score_pairs(pairs)
    # the vocabulary projection in chunks of positions (as rows longer than 512 are scored)
    monkeypatch.setattr(lm_mod, "LOGIT_CHUNK", 8)
    monkeypatch.setattr(lm_mod, "MIN_CHUNK", 8)
    chunked = BTLMEvalLM(handle, batch_size=8, progress=False)
    c = chunked.score_pairs(pairs)
    assert {s[2] for s in chunked.compiled_shapes} & {16, 24, 32, 48}
    for got in (a, b, c):
        np.testing.assert_allclose([x[0] for x in got], [r[0] for r in refs], rtol=1e-4,
                                   atol=2e-3)
        assert [x[1] for x in got] == [r[1] for r in refs]


def test_rolling_loglikelihood_is_the_sum_over_windows(handle, tmp_path):
    write_roll_task(tmp_path)
    samples = _run_task(handle, tmp_path, "local_roll", batch_size=2)[1]["samples"]["local_roll"]
    assert len(handle.tokenizer.encode(ROLL_DOCS[1]["text"])) > 2 * L  # three windows
    for s in samples:
        text = ROLL_DOCS[s["doc_id"]]["text"]
        got = s["resps"][0][0]
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert got == pytest.approx(ref_rolling(handle, text), rel=1e-4, abs=2e-3)


def test_generate_until_equals_greedy_decoding_stopped_at_the_stop_string(handle, tmp_path):
    from btlm_jax.harness import BTLMEvalLM, evaluate

    # a stop string the first prompt's greedy continuation actually reaches mid-way
    frees = [ref_greedy(handle, d["prompt"], until=[]) for d in GEN_DOCS]
    k = next(i for i, f in enumerate(frees) if len(f) >= 6)
    free = frees[k]
    stop = free[4:6]
    until = [stop, "\n"]
    write_gen_task(tmp_path, until)
    lm = BTLMEvalLM(handle, batch_size=2, progress=False)
    res = evaluate(lm, "local_gen", include_path=str(tmp_path), log_samples=True,
                   bootstrap_iters=0)
    samples = res["samples"]["local_gen"]
    assert len(samples) == len(GEN_DOCS)
    hits = []
    for s in samples:
        doc = GEN_DOCS[s["doc_id"]]
        ref = ref_greedy(handle, doc["prompt"], until)
        got = s["resps"][0][0]
        assert got == ref, (doc["prompt"], got, ref)
        hits.append(float(got == doc["answer"]))
    first = next(s for s in samples if s["doc_id"] == k)
    assert first["resps"][0][0] == free.split(stop)[0] and len(free.split(stop)[0]) <= 4
    assert res["results"]["local_gen"]["exact_match,none"] == pytest.approx(np.mean(hits))


@pytest.mark.slow
def test_harness_metrics_hook_on_live_parameters(handle, tmp_path):
    from btlm_jax.harness.hook import harness_metrics

    write_mc_task(tmp_path)
    cfg = handle.cfg
    assert harness_metrics(cfg, handle.model, handle.params, handle.tokenizer) == {}
    cfg = default_config()
    cfg.model = handle.cfg.model
    cfg.eval.harness_tasks = "local_mc"
    cfg.eval.harness_include_path = str(tmp_path)
    cfg.eval.harness_limit = 3
    cfg.eval.batch_size = 4
    out = harness_metrics(cfg, handle.model, handle.params, handle.tokenizer)
    tok = handle.tokenizer
    ref = []
    for doc in MC_DOCS[:3]:
        lls = [ref_loglikelihood(handle, *ref_split(tok, doc["question"], " " + c))[0]
               for c in doc["choices"]]
        ref.append(float(int(np.argmax(lls)) == doc["label"]))
    assert set(out) == {"harness/local_mc/acc"}
    assert out["harness/local_mc/acc"] == pytest.approx(np.mean(ref))
    # other parameters, same compiled model: the metric follows the live parameters
    other = make_handle(seed=3)
    out2 = harness_metrics(cfg, handle.model, other.params, handle.tokenizer)
    ref2 = []
    for doc in MC_DOCS[:3]:
        lls = [ref_loglikelihood(other, *ref_split(tok, doc["question"], " " + c))[0]
               for c in doc["choices"]]
        ref2.append(float(int(np.argmax(lls)) == doc["label"]))
    assert out2["harness/local_mc/acc"] == pytest.approx(np.mean(ref2))


def test_cli_json_last_line_and_errors(handle, tmp_path, monkeypatch, capsys):
    from absl import flags

    from btlm_jax.harness import __main__ as cli
    from btlm_jax.harness import lm as lm_mod

    write_mc_task(tmp_path)
    monkeypatch.setattr(lm_mod, "load_handle", lambda path: handle)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", "--model=ignored", "--tasks=local_mc", f"--include_path={tmp_path}",
                 "--limit=3", "--batch_size=2", "--log_samples", "--json",
                 f"--output_path={tmp_path / 'out'}", "--bootstrap_iters=0"])
    cli.main(["prog"])
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert set(res["samples"]) == {"local_mc"} and len(res["samples"]["local_mc"]) == 3
    assert "acc,none" in res["results"]["local_mc"]
    # lm_eval's layout: OUT/<model folder name>/ (not OUT/None/)
    assert [p.parent.name for p in (tmp_path / "out").rglob("results_*.json")] == ["ignored"]
    assert [p.parent.name for p in (tmp_path / "out").rglob("samples_local_mc_*.jsonl")] == \
        ["ignored"]
    # an unknown task: one line naming it (the built-in index, 10 s to build, stood in for
    # by the include directory's own index)
    from lm_eval.tasks import TaskManager

    from btlm_jax.harness import run as run_mod

    monkeypatch.setitem(run_mod._TASK_MANAGERS, (str(tmp_path), True),
                        TaskManager(include_path=str(tmp_path), include_defaults=False))
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", "--model=ignored", "--tasks=local_mc,no_such_task_xyz",
                 f"--include_path={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        cli.main(["prog"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no_such_task_xyz" in err[-1] and "local_mc" not in err[-1].split(":")[0]
    flags.FLAGS.unparse_flags()


@pytest.mark.slow
def test_dynamic_alibi_scaling_scores_and_generations_equal_unpadded(tmp_path):
    """With a dynamic alibi_scaling the slopes depend on the key count, so padding would change
    the numbers; the harness batches such sequences at their exact length."""
    from btlm_jax.harness import BTLMEvalLM, evaluate

    h = make_handle(seed=1, dynamic_len=32)
    write_mc_task(tmp_path)
    lm = BTLMEvalLM(h, batch_size=4, progress=False)
    res = evaluate(lm, "local_mc", include_path=str(tmp_path), log_samples=True,
                   bootstrap_iters=0, limit=3)
    n = 0
    for s in res["samples"]["local_mc"]:
        for (ctx, cont), r in zip(args_of(s), s["resps"]):
            ref = ref_loglikelihood(h, *ref_split(h.tokenizer, ctx, cont))
            assert r[0][0] == pytest.approx(ref[0], rel=1e-4, abs=2e-3)
            n += 1
    assert n >= 8
    # the scaling matters here: without it the first long request scores differently
    plain = make_handle(seed=1)
    ctx, cont = ref_split(h.tokenizer, MC_DOCS[2]["question"], " yes")
    assert abs(ref_loglikelihood(plain, ctx, cont)[0] - ref_loglikelihood(h, ctx, cont)[0]) > 1e-3
    until = ["\n"]
    docs = [GEN_DOCS[0], GEN_DOCS[2]]  # 16 and (truncated) 44 prompt tokens: below and above 32
    outs = lm.generate_until([SimpleNamespace(args=(d["prompt"], {"until": until,
                                                                   "max_gen_toks": 4}))
                              for d in docs])
    assert outs == [ref_greedy(h, d["prompt"], until, max_gen=4) for d in docs]


@pytest.mark.slow
def test_cli_on_a_published_btlm_folder_matches_a_float64_reference(tmp_path):
    """``python -m btlm_jax.harness --model=HF_DIR ... --log_samples --json`` on a tiny
    checkpoint in the published BTLM layout (dynamic alibi_scaling): every logged
    log-likelihood equals the float64 NumPy BTLM forward of tests/test_load_model.py."""
    pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_load_model import published_config, reference_logits, write_published_btlm

    from btlm_jax.data.tokenizer import load_tokenizer

    hf = tmp_path / "hf"
    hf.mkdir()
    scaling = {"type": "linear", "train_seq_len": 16}
    t = write_published_btlm(hf, alibi_scaling=scaling)
    c = published_config(len(json.loads((hf / "vocab.json").read_text())), "mup_", scaling)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_mc_task(tasks)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "btlm_jax.harness", f"--model={hf}", "--tasks=local_mc",
         f"--include_path={tasks}", "--log_samples", "--json", "--limit=4", "--batch_size=4",
         "--bootstrap_iters=0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = load_tokenizer(hf)
    n_pos = c["n_positions"]
    for s in res["samples"]["local_mc"]:
        lls = []
        for (ctx, cont), r in zip(args_of(s), s["resps"]):
            cids, xids = ref_split(tok, ctx, cont)
            seq = (cids + xids)[-(n_pos + 1):]
            logits = reference_logits(t, c, np.array([seq[:-1]]))[0]
            lp = logits - logits.max(-1, keepdims=True)
            lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
            n = len(seq) - 1
            ref = sum(lp[i, seq[i + 1]] for i in range(n - len(xids), n))
            assert r[0][0] == pytest.approx(ref, abs=2e-3), (ctx, cont)
            lls.append(ref)
        assert s["acc"] == float(int(np.argmax(lls)) == MC_DOCS[s["doc_id"]]["label"])


@pytest.mark.slow
def test_paper_task_sets_name_lm_eval_tasks():
    """configs/harness/*.yaml: every task exists in the installed lm_eval, with its shots."""
    import yaml
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(ROOT / "configs" / "harness"))
    known = set(tm.all_tasks)
    shots = {}
    for f in sorted((ROOT / "configs" / "harness").glob("*.yaml")):
        g = yaml.safe_load(f.read_text())
        assert g["group"] in known
        for t in g["task"]:
            assert t["task"] in known, (f.name, t["task"])
            shots[t["task"]] = t["num_fewshot"]
    assert shots["mmlu"] == 5 and all(v == 0 for k, v in shots.items() if k != "mmlu")
    assert {"piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "mmlu"} <= set(shots)


def _mesh_worker():
    """Run in a subprocess with 4 CPU devices: the parameters placed (replicated) on a
    (data 2, fsdp 2) mesh, so the harness splits its batches over both axes. Prints JSON."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from btlm_jax.harness import BTLMEvalLM

    assert len(jax.devices()) == 4
    h = make_handle()
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "fsdp"))
    h.params = jax.device_put(h.params, NamedSharding(mesh, P()))
    lm = BTLMEvalLM(h, batch_size=3, progress=False)  # rounded up to the 4 batch shards
    tok = h.tokenizer
    pairs = [ref_split(tok, d["question"], " " + c) for d in MC_DOCS[:4] for c in d["choices"]]
    got = lm.score_pairs(pairs)
    refs = [ref_loglikelihood(h, *p) for p in pairs]
    gens = lm.generate_until([SimpleNamespace(args=(d["prompt"], {"until": ["\n"],
                                                                   "max_gen_toks": 4}))
                              for d in GEN_DOCS[:2]])
    print(json.dumps({"batch_size": lm.batch_size, "axes": list(lm.batch_axes),
                      "got": [g[0] for g in got], "ref": [r[0] for r in refs],
                      "gens": gens,
                      "ref_gens": [ref_greedy(h, d["prompt"], ["\n"], 4) for d in GEN_DOCS[:2]]}))


@pytest.mark.slow
def test_batches_split_over_a_multi_device_mesh(tmp_path):
    import subprocess

    env = dict(os.environ, XLA_FLAGS=xla_flags(4),
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "mesh_worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["batch_size"] == 4 and out["axes"] == ["data", "fsdp"]
    np.testing.assert_allclose(out["got"], out["ref"], rtol=1e-4, atol=2e-3)
    assert out["gens"] == out["ref_gens"]



@pytest.mark.slow
def test_in_loop_harness_metrics_in_a_tiny_run(tmp_path):
    """``eval.harness_tasks`` in a ``tiny`` run: harness/<task>/<metric> at every evaluation
    step in metrics.jsonl, computed on the live parameters (the last one equals the metric on
    the checkpoint saved at that step)."""
    from configs.btlm import get_config

    import btlm_jax
    from btlm_jax.harness.hook import harness_metrics
    from btlm_jax.train.loop import train

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_mc_task(tasks)
    c = get_config("tiny")
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 512, 64, 2, 2, 128
    m.mup.base_d_model, m.mup.base_d_ff = 64, 128.0
    c.data.tokenizer, c.data.cache_dir = "bytes", str(tmp_path / "cache")
    c.train.seq_len, c.train.batch_size, c.train.steps, c.train.log_every_steps = 64, 4, 4, 2
    c.optim.warmup_steps = 1
    c.eval.every_steps, c.eval.num_batches, c.eval.batch_size = 2, 1, 4
    c.eval.harness_tasks, c.eval.harness_include_path = "local_mc", str(tasks)
    c.eval.harness_limit = 3
    c.logging.progress_bar = c.logging.tensorboard = c.logging.measure_peak = False
    c.checkpoint.async_save, c.checkpoint.every_steps = False, 2
    train(c, str(tmp_path / "run"))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "harness/local_mc/acc" in r]
    assert steps == [r["step"] for r in recs if "eval_loss" in r] == [2, 4]
    accs = [r["harness/local_mc/acc"] for r in recs if "harness/local_mc/acc" in r]
    assert all(a in (0.0, 1 / 3, 2 / 3, 1.0) for a in accs)
    lm = btlm_jax.load_model(tmp_path / "run")
    again = harness_metrics(c, lm.model, lm.params, lm.tokenizer)
    assert again["harness/local_mc/acc"] == pytest.approx(accs[-1])


if __name__ == "__main__" and sys.argv[1:] == ["mesh_worker"]:
    _mesh_worker()
