"""The shape of the codebase (issue 14): a pure program, a read-only run directory, one placement
path, rules and remat policies in the config, metric sinks as hooks."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import xla_flags

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "btlm_jax"


# ----------------------------------------------------------------------------------------------
# Static checks of the layout.


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_over_80_lines():
    long = [f"{p.relative_to(ROOT)}:{line} {name} ({n} lines)"
            for p in sorted(PKG.rglob("*.py")) for name, line, n in _functions(p) if n > 80]
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_parallel_does_not_import_train():
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p in sorted((PKG / "parallel").rglob("*.py"))
           for m in _imports(p) if m == "btlm_jax.train" or m.startswith("btlm_jax.train.")]
    assert not bad, bad


# ----------------------------------------------------------------------------------------------
# One placement path: optimizer state follows the parameters by structure; rules in the config.

_PLACEMENT = r"""
import json, jax
from jax.sharding import NamedSharding
from configs.btlm import get_config
from btlm_jax.train.program import Program
from btlm_jax.parallel.mesh import ShardingError
c = get_config('tiny')
c.model.vocab_size, c.model.d_ff = 512, 4096
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 1, 4
p = Program.from_config(c)
params = {jax.tree_util.keystr(k): s for k, s in
          jax.tree_util.tree_flatten_with_path(p.state_shardings.params)[0]}
opt = [(jax.tree_util.keystr(k), s) for k, s in
       jax.tree_util.tree_flatten_with_path(p.state_shardings.opt_state,
                                            is_leaf=lambda x: isinstance(x, NamedSharding))[0]]
shapes = {jax.tree_util.keystr(k): tuple(a.shape) for k, a in
          jax.tree_util.tree_flatten_with_path(p.abstract_state.opt_state)[0]}
out = {"params": {k: str(s.spec) for k, s in params.items()},
       "opt": [[k, str(s.spec), shapes[k]] for k, s in opt]}
c.mesh.rules = tuple('mlp=' if r.startswith('mlp=') else r for r in c.mesh.rules)
try:
    Program.from_config(c)
    out["no_mlp_rule"] = "ok"
except ShardingError as e:
    out["no_mlp_rule"] = str(e)
print("JSON" + json.dumps(out))
"""


def _spawn_python(code: str, devices: int = 8, timeout: int = 300, env_extra=None):
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_optimizer_state_follows_parameters_and_rules_come_from_config():
    out = _spawn_python(_PLACEMENT)
    res = json.loads(out.stdout.split("JSON", 1)[1])
    params, opt = res["params"], res["opt"]
    # every Adam moment (a leaf under mu / nu) has exactly its parameter's sharding
    moments = [(k, spec) for k, spec, _ in opt if "mu" in k or "nu" in k]
    assert len(moments) == 2 * len(params), (len(moments), len(params))
    for k, spec in moments:
        owner = [pk for pk in params if k.endswith(pk)]
        assert len(owner) == 1, k
        assert spec == params[owner[0]], (k, spec, params[owner[0]])
    # the MLP kernels are split over tensor by the default rules ...
    assert "tensor" in params["['layers']['mlp']['wi_0']['kernel']"]
    # ... and the scalars of the state (counts) are replicated
    assert all(spec == "PartitionSpec()" for k, spec, shape in opt if shape == ())
    # a rule table from the config that replicates the MLP is refused, naming parameter and key
    assert "layers/mlp/wi_0/kernel" in res["no_mlp_rule"] and "mesh.rules" in res["no_mlp_rule"]


def test_bad_rules_are_named():
    from btlm_jax.parallel.mesh import ShardingError
    from btlm_jax.parallel.sharding import DEFAULT_RULES, parse_rules

    rules = dict(parse_rules(DEFAULT_RULES))
    assert rules["act_batch"] == ("data", "fsdp") and rules["kv"] is None
    assert rules["embed"] == "fsdp"
    for bad, word in ((("embed=fsdp", "embed=tensor"), "twice"), (("embed=pipeline",), "pipeline"),
                      (("embed",), re.escape("mesh.rules[0]"))):
        with pytest.raises(ShardingError, match=word):
            parse_rules(bad)


# ----------------------------------------------------------------------------------------------
# Named remat policies: same gradients as no rematerialisation.


@pytest.mark.parametrize("policy", ["save_qkv", "save_attention_out", "save_qkv_attention_out",
                                    "full", pytest.param("minimal_flash",
                                                         marks=pytest.mark.slow)])
def test_named_remat_policies_give_the_same_gradients(policy):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from btlm_jax.config import default_config
    from btlm_jax.models.btlm import BTLM

    c = default_config().model
    c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.d_ff = 64, 32, 2, 4, 64
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    params = nn.unbox(BTLM(c).init(jax.random.PRNGKey(0), tokens)["params"])

    def grads(remat):
        c2 = c.copy_and_resolve_references()
        c2.remat = remat
        model = BTLM(c2)
        loss = lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    ref, got = grads("none"), grads(policy)
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Reading a run never writes: export, import of the export, evaluation, with an empty HOME.


def _tiny_cfg(cache_dir, **over):
    from tests import helpers

    base = {"train.steps": 2, "optim.warmup_steps": 1, "eval.num_batches": 1,
            "eval.every_steps": 2}
    return helpers.small(cache_dir, seq_len=32, batch_size=2, **{**base, **over})


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_reading_a_run_writes_nothing_with_an_empty_home(tmp_path):
    from btlm_jax.train.loop import train

    cache = tmp_path / "cache"
    run = tmp_path / "run"
    train(_tiny_cfg(cache), str(run))
    assert (run / "tokenizer").is_dir() and any((run / "tokenizer").iterdir())
    before_run, before_cache = _tree_digest(run), _tree_digest(cache)
    config_bytes = (run / "config.json").read_bytes()
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "BTLM_JAX_CACHE": ""}
    exp = tmp_path / "export"
    tok = next((run / "tokenizer").glob("*.model"))
    cmds = [
        ["btlm_jax.convert", "export", f"--workdir={run}", f"--out={exp}"],
        ["btlm_jax.convert", "import", f"--hf_dir={exp}", f"--workdir={tmp_path / 'run2'}",
         f"--tokenizer={tok}"],
        ["btlm_jax.evaluate", f"--workdir={run}", "--lengths=32", "--json"],
    ]
    for cmd in cmds:
        out = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True,
                             text=True, timeout=300,
                             env=dict(os.environ, PYTHONPATH=str(ROOT), **env))
        assert out.returncode == 0, (cmd, out.stderr[-3000:])
    # nothing of ours under the (empty) HOME (matplotlib may keep its own font cache there)
    assert [p for p in home.rglob("*") if p.is_file() and "matplotlib" not in str(p)] == []
    assert not (home / ".cache" / "btlm_jax").exists()
    assert _tree_digest(cache) == before_cache  # no corpus built, no tokenizer trained
    # config.json byte-identical, checkpoints and tokenizer untouched; the only new files are
    # evaluate's own report (RUN/eval/: results.json and plots; skipped on a read-only run)
    after = _tree_digest(run)
    assert {k: v for k, v in after.items() if not k.startswith("eval/")} == before_run
    assert (run / "config.json").read_bytes() == config_bytes
    res = json.loads(out.stdout.strip().splitlines()[-1])["results"]
    assert res[0]["length"] == 32 and res[0]["loss"] > 0


@pytest.mark.slow
def test_changed_data_on_resume_keeps_the_pinned_tokenizer(tmp_path, capfd):
    from btlm_jax.data.tokenizer import load_tokenizer
    from btlm_jax.train.loop import train

    cache, run = tmp_path / "cache", tmp_path / "run"
    train(_tiny_cfg(cache), str(run))
    pinned = _tree_digest(run / "tokenizer")
    texts = tmp_path / "other"
    texts.mkdir()
    for i in range(40):
        (texts / f"{i}.txt").write_text(" ".join(f"zyx{(i * 7 + j) % 97}" for j in range(300)))
    out = train(_tiny_cfg(cache, **{"train.steps": 3, "data.train": f"{texts}/*.txt",
                                    "data.eval": f"{texts}/*.txt"}), str(run))
    assert out["step"] == 3
    assert _tree_digest(run / "tokenizer") == pinned
    assert len(list((cache / "tokenizers").glob("*.model"))) == 1  # no second one was trained
    err = capfd.readouterr().out
    assert "the run's own copy" in err
    tok = load_tokenizer(run / "tokenizer")
    assert tok.vocab_size <= 512


# ----------------------------------------------------------------------------------------------
# Metric sinks: Weights & Biases, offline.


@pytest.mark.slow
def test_wandb_sink_offline(tmp_path):
    pytest.importorskip("wandb")
    from btlm_jax.train.loop import train

    run = tmp_path / "run"
    os.environ["WANDB_SILENT"] = "true"
    train(_tiny_cfg(tmp_path / "cache", **{"logging.wandb": True, "logging.wandb_mode": "offline",
                                           "train.log_every_steps": 1}), str(run))
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    # one offline run (wandb's own record file) that holds every logged value as JSON text
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, list((run / "wandb").rglob("*"))
    data = files[0].read_bytes()
    assert data.startswith(b":W&B")
    for rec in recs:
        for key in ("loss", "grad_norm"):
            assert repr(rec[key]).encode() in data, (key, rec[key])
    assert repr(recs[-1]["eval_loss"]).encode() in data
