"""adamw / adamw_ema against optax.adamw; muP group rules; build() and group_metrics."""

import jax
import jax.numpy as jnp
from flax import linen as nn
import numpy as np
import optax
import pytest

from btlm_jax import optim
from btlm_jax.config import default_config
from btlm_jax.models.btlm import BTLM
from btlm_jax.optim import GroupRules, ParamGroup, ema_coefficients, schedule

PEAK, T, W, WD = 2e-2, 500, 25, 0.1
MULTS = {"hidden": 0.25, "hidden_ff": 0.4, "embed": 1.0, "no_decay": 1.0}
RULES = GroupRules(
    rules=(("*/bias", "no_decay"), ("*/scale", "no_decay"), ("*/embedding", "embed"),
           ("*/mlp/wo/kernel", "hidden_ff"), ("*/kernel", "hidden")),
    groups={"hidden": ParamGroup(MULTS["hidden"]), "hidden_ff": ParamGroup(MULTS["hidden_ff"]),
            "embed": ParamGroup(1.0), "no_decay": ParamGroup(1.0, weight_decay=False)})
# Written out by hand (not derived from RULES): the reference optimizer's groups.
HAND_LABELS = {
    "embed": {"embedding": "embed"},
    "layers": {
        "attn": {"query": {"kernel": "hidden", "bias": "no_decay"}},
        "ln_1": {"scale": "no_decay", "bias": "no_decay"},
        "mlp": {"wi_0": {"kernel": "hidden"}, "wo": {"kernel": "hidden_ff", "bias": "no_decay"}},
    },
    "ln_f": {"scale": "no_decay"},
}
SHAPES = {
    "embed": {"embedding": (24, 8)},
    "layers": {
        "attn": {"query": {"kernel": (2, 8, 2, 4), "bias": (2, 2, 4)}},
        "ln_1": {"scale": (2, 8), "bias": (2, 8)},
        "mlp": {"wi_0": {"kernel": (2, 8, 12)}, "wo": {"kernel": (2, 12, 8), "bias": (2, 8)}},
    },
    "ln_f": {"scale": (8,)},
}


def random_problem(seed=0):
    rng = np.random.default_rng(seed)
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32), SHAPES,
                          is_leaf=is_shape)
    targets = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), SHAPES,
                           is_leaf=is_shape)

    def loss(p):  # non-quadratic so the Adam direction changes along the trajectory
        return sum(jnp.sum(jnp.sin(3 * a) * b + 0.5 * (a - b) ** 2)
                   for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(targets)))
    return params, loss


def run(tx, params, loss, steps=T):
    grad = jax.grad(loss)

    def body(carry, _):
        p, s = carry
        u, s = tx.update(grad(p), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, s), _ = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=steps))(
        params, tx.init(params))
    return p, s


def reference_groups(sched, independent=False):
    """optax.adamw per hand-labelled group (the ordinary optimizer, independent of btlm_jax)."""
    return optax.multi_transform(
        {g: optax.adamw(lambda c, m=m: sched(c) * m, b1=0.9, b2=0.95, eps=1e-8,
                        weight_decay=0.0 if g == "no_decay" else WD)
         for g, m in MULTS.items()}, HAND_LABELS)


def max_rel_err(a, b):
    return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_rules_label_the_hand_tree():
    params, _ = random_problem()
    assert RULES.labels(params) == HAND_LABELS


@pytest.mark.parametrize("which", ["adamw", "adamw_ema"])
def test_matches_optax_adamw_with_mup_groups_d2z(which):
    sched = schedule("d2z", peak_lr=PEAK, total_steps=T, warmup_steps=W)
    params, loss = random_problem()
    ref, _ = run(reference_groups(sched), params, loss)
    tx = getattr(optim, which)(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=WD, groups=RULES,
                               total_steps=T)
    got, state = run(tx, params, loss)
    moved = max_rel_err(ref, params)
    assert moved > 0.1  # the parameters travelled far from init (weight decay and updates)
    err = max_rel_err(got, ref)
    assert err < 2e-5, err  # float32 rounding only
    # the state's per-group c_{T,0} and tau against float64 timescales of the same schedule
    lrs = np.asarray(sched(np.arange(T)), np.float64)
    metrics = optim.group_metrics(state, T)
    for g in ("hidden", "hidden_ff", "embed"):
        c0 = ema_coefficients(lrs * MULTS[g], WD)[0]
        assert float(metrics[f"opt/{g}/c_t0"]) == pytest.approx(c0, rel=1e-5)
        last = lrs[-1] * MULTS[g]
        assert float(metrics[f"opt/{g}/lr"]) == pytest.approx(last, rel=1e-5)
        assert float(metrics[f"opt/{g}/tau_over_T"]) == pytest.approx(1 / (last * WD) / T, rel=1e-5)
    assert "opt/no_decay/c_t0" not in metrics
    assert float(metrics["opt/no_decay/lr"]) == pytest.approx(lrs[-1], rel=1e-5)


@pytest.mark.parametrize("which", ["adamw", "adamw_ema"])
def test_matches_optax_adamw_with_mask_only(which):
    sched = schedule("cosine_10x", peak_lr=PEAK, total_steps=200, warmup_steps=10)
    params, loss = random_problem(1)

    def mask(p):  # decay only 2-D+ leaves, the usual optax idiom
        return jax.tree.map(lambda x: x.ndim >= 2, p)
    ref, _ = run(optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=WD, mask=mask),
                 params, loss, steps=200)
    got, state = run(getattr(optim, which)(sched, weight_decay=WD, mask=mask), params, loss,
                     steps=200)
    assert max_rel_err(got, ref) < 2e-5
    lrs = np.asarray(sched(np.arange(200)), np.float64)
    c0 = float(optim.group_metrics(state)["opt/decay/c_t0"])
    assert c0 == pytest.approx(ema_coefficients(lrs, WD)[0], rel=1e-5)


def test_independent_weight_decay():
    """theta *= 1 - lambda * eta_t / peak, and the EMA view with alpha_t = lambda eta_t / peak."""
    steps, lam = 200, 3e-3
    # a decaying LR: at a long constant LR (wsd) Adam on this loss is chaotic and amplifies
    # float32 rounding past 1e-5 (measured 5e-5 with wsd, 1e-6 with cosine_d2z)
    sched = schedule("cosine_d2z", peak_lr=PEAK, total_steps=steps, warmup_steps=10)
    params, loss = random_problem(2)
    grad = jax.grad(loss)
    labels = HAND_LABELS
    # reference loop written from the formula with optax's Adam direction
    adam = optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8)

    def body(carry, t):
        p, s = carry
        u, s = adam.update(grad(p), s)
        eta = sched(t)
        p = jax.tree.map(
            lambda x, d, g: x - eta * MULTS[g] * d
            - (0.0 if g == "no_decay" else lam * eta / PEAK) * x, p, u, labels)
        return (p, s), None

    (p, _), _ = jax.jit(lambda p: jax.lax.scan(body, (p, adam.init(p)), jnp.arange(steps)))(
        params)
    for which in ("adamw", "adamw_ema"):
        tx = getattr(optim, which)(sched, weight_decay=lam, groups=RULES,
                                   independent_weight_decay=True, peak_lr=PEAK, total_steps=steps)
        got, state = run(tx, params, loss, steps=steps)
        assert max_rel_err(got, p) < 2e-5, which
        shape = np.asarray(sched(np.arange(steps)), np.float64) / PEAK
        m = optim.group_metrics(state)
        for g in ("hidden", "embed"):  # independent of the group's LR multiplier
            assert float(m[f"opt/{g}/c_t0"]) == pytest.approx(
                ema_coefficients(shape, lam)[0], rel=1e-5)


def tiny_cfg(**model):
    cfg = default_config()
    cfg.model.update(dict(vocab_size=64, d_model=64, n_heads=2, d_ff=160, n_layers=2), **model)
    return cfg


def model_params(cfg):
    shapes = jax.eval_shape(BTLM(cfg.model).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 8), jnp.int32))
    return shapes["params"]


def expected_groups(cfg):
    blocks = (["layers"] if cfg.model.scan_layers
              else [f"layers_{i}" for i in range(cfg.model.n_layers)])
    mlp_in = ["wi_0", "wi_1"] if cfg.model.activation == "swiglu" else ["wi"]
    exp = {"hidden": [], "hidden_ff": [], "embed": ["embed/embedding"],
           "no_decay": ["ln_f/bias", "ln_f/scale"]}
    if cfg.model.position == "learned":
        exp["embed"].append("pos_embed/embedding")
    for b in blocks:
        for n in ("query", "key", "value", "out"):
            exp["hidden"].append(f"{b}/attn/{n}/kernel")
            exp["no_decay"].append(f"{b}/attn/{n}/bias")
        for n in mlp_in:
            exp["hidden"].append(f"{b}/mlp/{n}/kernel")
            exp["no_decay"].append(f"{b}/mlp/{n}/bias")
        exp["hidden_ff"].append(f"{b}/mlp/wo/kernel")
        exp["no_decay"].append(f"{b}/mlp/wo/bias")
        for ln in ("ln_1", "ln_2"):
            exp["no_decay"] += [f"{b}/{ln}/scale", f"{b}/{ln}/bias"]
    return {k: sorted(v) for k, v in exp.items()}


@pytest.mark.parametrize("model", [
    {}, {"scan_layers": False, "activation": "gelu", "position": "learned"}])
def test_mup_rules_hit_the_intended_model_parameters(model):
    cfg = tiny_cfg(**model)
    got = {k: sorted(v) for k, v in optim.mup_groups(cfg).assignment(model_params(cfg)).items()}
    assert got == expected_groups(cfg)


def test_mup_multipliers():
    cfg = tiny_cfg(d_model=512, d_ff=1366, n_heads=4)
    g = optim.mup_groups(cfg).groups
    assert g["hidden"].lr_mult == pytest.approx(256 / 512)
    assert g["hidden_ff"].lr_mult == pytest.approx((8 / 3 * 256) / 1366)
    assert (g["embed"].lr_mult, g["embed"].weight_decay) == (1.0, True)
    assert (g["no_decay"].lr_mult, g["no_decay"].weight_decay) == (1.0, False)
    for off in ("model.mup.enabled", "optim.mup_lr_scaling"):
        c = tiny_cfg(d_model=512, d_ff=1366, n_heads=4)
        sec, *rest = off.split(".")
        node = c[sec]
        for r in rest[:-1]:
            node = node[r]
        node[rest[-1]] = False
        assert {n: x.lr_mult for n, x in optim.mup_groups(c).groups.items()} == {
            "hidden": 1.0, "hidden_ff": 1.0, "embed": 1.0, "no_decay": 1.0}


def test_unmatched_parameter_is_named():
    with pytest.raises(ValueError, match="mystery/weights"):
        optim.mup_groups(tiny_cfg()).labels({"mystery": {"weights": jnp.zeros(2)}})


@pytest.mark.slow
def test_build_on_real_model_matches_reference():
    """build(): clip + adamw_ema with muP groups on the BTLM model's LM loss, D2Z, vs optax."""
    cfg = tiny_cfg(d_model=32, n_heads=2, d_ff=80, n_layers=1)
    cfg.model.mup.update(base_d_model=16, base_d_ff=40.0)  # w = w_ff = 2
    steps = 100
    cfg.optim.update(name="adamw_ema", schedule="d2z", peak_lr=3e-3, warmup_steps=10,
                     grad_clip=0.5)
    tx, sched = optim.build(cfg, steps)
    model = BTLM(cfg.model)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (4, 17)), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens[:, :-1])["params"])

    def loss(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    assert float(optax.tree.norm(jax.grad(loss)(params))) > 0.5  # clipping is active
    mults = {"hidden": 0.5, "hidden_ff": 0.5, "embed": 1.0, "no_decay": 1.0}
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: ("no_decay" if path[-1].key in ("bias", "scale") else
                         "embed" if path[-1].key == "embedding" else
                         "hidden_ff" if path[-2].key == "wo" else "hidden"), params)
    ref_tx = optax.chain(optax.clip_by_global_norm(0.5), optax.multi_transform(
        {g: optax.adamw(lambda c, m=m: sched(c) * m, b1=0.9, b2=0.95, eps=1e-8,
                        weight_decay=0.0 if g == "no_decay" else 0.1)
         for g, m in mults.items()}, labels))
    ref, _ = run(ref_tx, params, loss, steps)
    got, state = run(tx, params, loss, steps)
    assert float(loss(ref)) < 0.5 * float(loss(params))  # it trained
    # The key bias's gradient is exactly 0 in exact arithmetic (softmax is shift invariant), so
    # Adam turns rounding noise into +-lr steps in each optimizer independently: it stays tiny
    # but cannot agree. Every other parameter must agree to float32 rounding.
    key_bias = [got["layers"]["attn"]["key"].pop("bias"), ref["layers"]["attn"]["key"].pop("bias")]
    assert max(float(jnp.max(jnp.abs(b))) for b in key_bias) < 1e-3
    assert max_rel_err(got, ref) < 2e-5
    m = optim.group_metrics(state, steps)
    assert set(m) == {
        "opt/hidden/lr", "opt/hidden_ff/lr", "opt/embed/lr", "opt/no_decay/lr",
        *(f"opt/{g}/{k}" for g in ("hidden", "hidden_ff", "embed")
          for k in ("tau_iter", "tau_over_T", "c_t0"))}
    lrs = np.asarray(sched(np.arange(steps)), np.float64)
    assert float(m["opt/hidden/c_t0"]) == pytest.approx(
        ema_coefficients(lrs * mults["hidden"], 0.1)[0], rel=1e-5)


@pytest.mark.parametrize("key, value, needle", [
    ("name", "sgd", "optim.name='sgd'"),
    ("schedule", "triangle", "optim.schedule='triangle'"),
    ("decay_ratio", 0.0, "optim.decay_ratio"),
    ("cooldown_fraction", 2.0, "optim.cooldown_fraction"),
    ("weight_decay", -1.0, "optim.weight_decay"),
])
def test_build_errors_name_the_key(key, value, needle):
    cfg = tiny_cfg()
    cfg.optim[key] = value
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        optim.build(cfg, 100)



