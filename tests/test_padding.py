"""Physical padding (``model.pad_multiple``): aligned arrays, the same logical model.

Checked against independent references: the unpadded model (pad_multiple=1) for initial values,
logits and 50 training steps; exact zeros for the padding after training (parameters and
optimizer moments, standard and weight-streaming layouts); the matmul shapes of every preset's
train step as lowered to HLO; and old run directories (no pad_multiple in config.json).
"""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from btlm_jax.config import ConfigError, default_config
from btlm_jax.models.btlm import BTLM
from btlm_jax.models.padding import (
    PADDED_PARAM_AXES, logical_num_params, nonzero_padding, padded_axis, physical_sizes,
    to_logical, to_physical)
from tests import helpers


def model_cfg(pad, *, scan=True, tie=True, activation="swiglu", position="alibi"):
    m = default_config().model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 97, 32, 2, 2, 72
    m.mup.base_d_model, m.mup.base_d_ff = 16, 36.0
    m.pad_multiple, m.scan_layers, m.tie_embeddings = pad, scan, tie
    m.activation, m.position, m.max_seq_len = activation, position, 16
    return m


def init(m, seed=3):
    return jax.jit(lambda r: nn.unbox(BTLM(m).init(r, jnp.zeros((1, 8), jnp.int32)))["params"])(
        jax.random.PRNGKey(seed))


def leaves(tree):
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


VARIANTS = [dict(), dict(scan=False, tie=False, activation="gelu", position="learned")]


def test_padded_axes_are_the_vocab_and_mlp_axes_of_every_parameter():
    # PADDED_PARAM_AXES (used by to_logical / to_physical / exports) against the logical axis
    # names the model itself gives its parameters, for every kind of parameter
    for v in VARIANTS:
        m = model_cfg(128, **v)
        boxed = jax.eval_shape(lambda r: BTLM(m).init(r, jnp.zeros((1, 8), jnp.int32)),
                               jax.random.PRNGKey(0))
        specs = nn.get_partition_spec(boxed)["params"]
        flat = jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
        for path, spec in flat:
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            want = [(ax, i - len(spec)) for i, ax in enumerate(spec) if ax in ("vocab", "mlp")]
            assert padded_axis(name) == (want[0] if want else None), name
    assert {a for _, a, _ in PADDED_PARAM_AXES} == {"vocab", "mlp"}


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_same_seed_same_logical_parameters_and_logits(variant):
    plain, padded = model_cfg(1, **VARIANTS[variant]), model_cfg(128, **VARIANTS[variant])
    assert physical_sizes(padded) == {"vocab": (97, 128), "mlp": (72, 128)}
    a, b = init(plain), init(padded)
    la, lb = leaves(a), leaves(to_logical(b, padded))
    assert la.keys() == lb.keys()
    for k in la:  # drawn at the logical shape, then padded: bit-identical
        np.testing.assert_array_equal(np.asarray(lb[k]), np.asarray(la[k]), err_msg=k)
    phys = leaves(b)
    padded_leaves = [k for k in phys if padded_axis(k)]
    assert phys["embed/embedding"].shape[-2] == 128 and len(padded_leaves) >= 3
    assert nonzero_padding(jax.device_get(b), padded) == []
    n_plain = sum(x.size for x in jax.tree_util.tree_leaves(a))
    assert logical_num_params(b, padded) == n_plain < sum(x.size for x in phys.values())
    # to_physical of the unpadded tree is the padded model's tree
    for k, x in leaves(to_physical(jax.device_get(a), padded)).items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(phys[k]), err_msg=k)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 11)), jnp.int32)
    got = jax.jit(lambda p, x: BTLM(padded).apply({"params": p}, x))(b, ids)
    want = jax.jit(lambda p, x: BTLM(plain).apply({"params": p}, x))(a, ids)
    assert got.shape == want.shape == (2, 11, 97)  # padded logits never leave the model
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_nonzero_padding_is_found_and_export_refuses_it():
    from btlm_jax.convert import hf

    m = model_cfg(128)
    p = jax.tree_util.tree_map(np.array, jax.device_get(init(m)))  # writable copies
    p["layers"]["mlp"]["wo"]["kernel"][1, 100, 3] = 0.5  # a padded FFN unit's output row
    assert nonzero_padding(p, m) == ["layers/mlp/wo/kernel"]
    with pytest.raises(hf.ConversionError, match="layers/mlp/wo/kernel.*pad_multiple=128"):
        hf.to_hf(p, m, "btlm")


def test_a_padded_axis_of_neither_size_is_named():
    m = model_cfg(128)  # vocabulary 97 -> 128
    p = {"embed": {"embedding": np.zeros((100, 32), np.float32)}}
    for fn in (to_logical, to_physical):
        with pytest.raises(ValueError, match=r"^embed/embedding: axis 0 has size 100, expected 97 "
                                             r"\(logical\) or 128 \(padded"):
            fn(p, m)


# ---------------------------------------------------------------------------- training
def train_cfg(pad, layout="standard", **over):
    base = {"model.vocab_size": 1000, "model.d_model": 32, "model.n_layers": 2,
            "model.n_heads": 2, "model.d_ff": 85, "model.mup.base_d_model": 16,
            "model.mup.base_d_ff": 42.5, "model.pad_multiple": pad, "train.seq_len": 16,
            "train.batch_size": 2, "train.steps": 50, "optim.peak_lr": 1e-2,
            "optim.warmup_steps": 5, "optim.grad_clip": 0.05, "optim.weight_decay": 0.1,
            "mesh.layout": layout}
    return helpers.preset("tiny", **{**base, **over})


def batches(n, vocab=1000, b=2, t=16, seed=0):
    rs = np.random.RandomState(seed)
    for _ in range(n):
        toks = rs.randint(0, vocab, (b, t + 1)).astype(np.int32)
        yield {"inputs": toks[:, :-1], "targets": toks[:, 1:],
               "loss_mask": np.ones((b, t), np.float32), "segment_ids": np.ones((b, t), np.int32),
               "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def train_losses(cfg, steps=50):
    from btlm_jax.train.program import Program

    prog = Program.from_config(cfg)
    state, out = prog.init_state(), []
    for batch in batches(steps):
        state, m = prog.train_step(state, prog.to_global(batch))
        out.append(float(m["loss"]))
        assert float(m["grad_norm"]) > 0.05  # clipping (at 0.05) is active
    return np.array(out), jax.device_get(state), prog


def padded_leaf_count(state, m) -> int:
    return sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]
               if padded_axis("/".join(str(getattr(k, "key", getattr(k, "name", k)))
                                       for k in path)))


@pytest.mark.slow
@pytest.mark.parametrize("layout,over", [
    ("standard", {}),
    ("weight_streaming", {"model.activation": "gelu", "model.tie_embeddings": False,
                          "train.grad_accum_steps": 2})])
def test_float32_training_equals_unpadded_and_padding_stays_zero(layout, over):
    # 50 steps of AdamW with weight decay, muP LR groups (w = 2) and clipping active at every
    # step; float32. The padded run's losses equal the unpadded run's (1e-6 relative) and every
    # padded row / unit of the parameters and of both Adam moments is exactly zero at the end.
    want, plain, _ = train_losses(train_cfg(1, layout, **over))
    got, state, prog = train_losses(train_cfg(128, layout, **over))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    m = prog.cfg.model
    assert physical_sizes(m) == {"vocab": (1000, 1024), "mlp": (85, 128)}
    # parameters + mu + nu: every padded leaf was looked at, and all of them are zero
    n_params = padded_leaf_count(state.params, m)
    assert n_params >= 4 and padded_leaf_count(state.opt_state, m) >= 2 * n_params
    assert nonzero_padding(state.params, m) == []
    assert nonzero_padding(state.opt_state, m) == []
    # and the logical parameters equal the unpadded run's
    for k, x in leaves(to_logical(state.params, m)).items():
        # atol 5e-5 (the lr is 1e-2): Adam divides by sqrt(nu), so an embedding row whose
        # gradient is rounding noise (a token barely seen) moves by a noise-driven part of the lr
        np.testing.assert_allclose(x, leaves(plain.params)[k], rtol=1e-4, atol=5e-5, err_msg=k)


# ---------------------------------------------------------------------------- HLO alignment
def preset_names():
    from configs.btlm import CEREBRAS_GPT

    return (["tiny", "bench", "3b_8k", "slimpajama_dc_1p3b"]
            + [f"cerebras_gpt_{k}" for k in CEREBRAS_GPT])


# an HLO instruction (lowered text: "name = f32[2,3]{1,0} op(...)"; compiled text names carry "%")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = \w+\[([\d,]*)\]")
_DOT = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = \w+\[[\d,]*\]\S* "
                  r"dot\(%?([\w.\-]+), %?([\w.\-]+)\)(.*)")


def _dims(attr, text):
    m = re.search(attr + r"=\{([\d,]*)\}", text)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def matmul_shapes(hlo: str) -> list[tuple[int, int, int]]:
    """(M, N, K) of every dot in HLO text: free dimensions of each side multiplied together
    (what a GEMM library is called with), contracting dimensions multiplied; batch dimensions
    are the loop around it."""
    shapes = {}
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if m:
            shapes[m.group(1)] = [int(x) for x in m.group(2).split(",") if x]
    out = []
    for line in hlo.splitlines():
        m = _DOT.match(line)
        if not m:
            continue
        lhs, rhs, attrs = shapes[m.group(1)], shapes[m.group(2)], m.group(3)
        lc, rc = _dims("lhs_contracting_dims", attrs), _dims("rhs_contracting_dims", attrs)
        lb, rb = _dims("lhs_batch_dims", attrs), _dims("rhs_batch_dims", attrs)
        free_l = [d for i, d in enumerate(lhs) if i not in lc + lb]
        free_r = [d for i, d in enumerate(rhs) if i not in rc + rb]
        out.append((int(np.prod(free_l)), int(np.prod(free_r)), int(np.prod([lhs[i] for i in lc]))))
    return out


def lowered_train_step(name, compiled=False, **over):
    """The preset's train step lowered for abstract inputs (nothing allocated) at its longest
    sequence, one sequence per micro-batch, as HLO text (``compiled``: after XLA:CPU's
    optimisation passes)."""
    from btlm_jax.config import parse_phases
    from btlm_jax.train.program import Program

    c = helpers.preset(name, **over)
    seq = max(p[0] for p in parse_phases(c))
    c.train.phases, c.train.seq_len = (), seq
    c.train.batch_size = c.train.grad_accum_steps
    c.train.steps = max(c.train.steps, c.optim.warmup_steps)
    prog = Program.from_config(c)
    with prog.tracing():
        low = prog.jit_train_step().lower(prog.abstract_state,
                                          prog.abstract_batch(seq, c.train.batch_size))
    return c, (low.compile().as_text() if compiled else low.as_text(dialect="hlo"))


def misaligned(c, hlo, multiple=64):
    """Matmul dimensions off a multiple of ``multiple``, less the listed exceptions: the head
    dimension (d_model / n_heads) where the model's own shape makes it so (the published
    BTLM-3B and Cerebras-GPT 2.7B have 80), as the contraction of q.k and the width of p.v."""
    d_head = c.model.d_model // c.model.n_heads
    allowed = {d_head} if d_head % multiple else set()
    return sorted({(mm, n, k) for mm, n, k in matmul_shapes(hlo)
                   if any(x % multiple and x not in allowed for x in (mm, n, k))})


def test_matmul_shape_parser_against_a_hand_written_einsum():
    def f(x, w, q, k):
        return jnp.einsum("btd,df->btf", x, w), jnp.einsum("bhqd,bhkd->bhqk", q, k)

    args = (jnp.zeros((2, 8, 24)), jnp.zeros((24, 40)), jnp.zeros((2, 3, 8, 16)),
            jnp.zeros((2, 3, 12, 16)))
    hlo = jax.jit(f).lower(*args).as_text(dialect="hlo")
    assert sorted(matmul_shapes(hlo)) == [(8, 12, 16), (16, 40, 24)]


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_train_step_has_aligned_matmuls(name):
    c, hlo = lowered_train_step(name)
    assert len(matmul_shapes(hlo)) >= 10
    assert misaligned(c, hlo) == [], name


@pytest.mark.slow
@pytest.mark.parametrize("name", preset_names())
def test_every_preset_compiled_train_step_has_aligned_matmuls(name):
    # the same after XLA's optimisation passes (on CPU; compiling allocates nothing)
    c, hlo = lowered_train_step(name, compiled=True)
    assert len(matmul_shapes(hlo)) >= 10
    assert misaligned(c, hlo) == [], name


def test_unpadded_3b_8k_has_misaligned_matmuls():
    # the check finds what padding removes: vocab 50257 and d_ff 6826 (the 1.6x)
    c, hlo = lowered_train_step("3b_8k", **{"model.pad_multiple": 1})
    bad = {x for shape in misaligned(c, hlo) for x in shape if x % 64 and x != 80}
    assert bad == {50257, 6826}


def test_flops_and_parameter_counts_are_logical():
    from btlm_jax.describe import describe
    from btlm_jax.train.flops import train_flops_per_token

    a = helpers.preset("3b_8k")
    b = helpers.preset("3b_8k", **{"model.pad_multiple": 1})
    assert a.model.pad_multiple == 128
    da, db = describe(a), describe(b)
    assert da["num_params"] == db["num_params"] == db["num_params_allocated"]
    assert da["num_params_allocated"] - da["num_params"] == (
        (50304 - 50257) * 2560 + 32 * 3 * (6912 - 6826) * 2560 + 32 * 2 * (6912 - 6826))
    assert train_flops_per_token(a.model, 2048) == train_flops_per_token(b.model, 2048)
    assert da["flops_per_token"] == db["flops_per_token"]


# ---------------------------------------------------------------------------- run directories
def run_cfg(cache_dir, **over):
    base = {"train.log_every_steps": 1, "optim.warmup_steps": 1, "eval.num_batches": 1,
            "eval.every_steps": 1000, "logging.measure_peak": False, "model.vocab_size": 500,
            "train.steps": 2, "checkpoint.every_steps": 2}
    return helpers.small(cache_dir, d_model=32, n_layers=1, d_ff=64, seq_len=32,
                         **{**base, **over})


@pytest.mark.slow
def test_checkpoints_are_physical_and_old_run_dirs_keep_working(tmp_path_factory):
    import btlm_jax
    from btlm_jax.train.loop import train

    cache = tmp_path_factory.mktemp("cache")
    new = tmp_path_factory.mktemp("runs") / "padded"
    train(run_cfg(cache), str(new))
    lm = btlm_jax.load_model(new)
    assert lm.cfg.model.pad_multiple == 128
    assert lm.params["embed"]["embedding"].shape == (512, 32)  # physical: 500 -> 512
    assert lm.params["layers"]["mlp"]["wo"]["kernel"].shape == (1, 128, 32)  # 64 -> 128
    assert nonzero_padding(jax.device_get(lm.params), lm.cfg.model) == []
    ids = np.arange(7)[None]
    assert lm.logits(ids).shape == (1, 7, 500)
    # a run directory written before model.pad_multiple existed: unpadded arrays, and a
    # config.json without the key
    old = new.parent / "old"
    train(run_cfg(cache, **{"model.pad_multiple": 1}), str(old))
    written = json.loads((old / "config.json").read_text())
    del written["model"]["pad_multiple"]
    (old / "config.json").write_text(json.dumps(written))
    lm_old = btlm_jax.load_model(old)  # read as what it is: unpadded
    assert lm_old.cfg.model.pad_multiple == 1
    assert lm_old.params["embed"]["embedding"].shape == (500, 32)
    # resuming with today's default (128) is refused, naming the key and the fix; no checkpoint
    # of the old run is touched
    before = sorted(p.name for p in (old / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=r"model\.pad_multiple was 1, now 128.*"
                                          r"--config\.model\.pad_multiple=1"):
        train(run_cfg(cache, **{"train.steps": 4}), str(old))
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == before
    # with the old value it resumes (and may switch attention, a compute-only key)
    train(run_cfg(cache, **{"train.steps": 4, "model.pad_multiple": 1,
                            "model.attention": "flash"}), str(old))
    assert btlm_jax.load_model(old).step == 4
