"""Train and evaluate text-only and multi-modal punctuation models on synthetic speech.

    python -m btlm_jax.punctuation.main --workdir=DIR [--config=configs/punctuation.py[:tiny]]
                                        [--config.train.steps=3000 ...]

Builds (or reuses) the espeak-ng dataset in ``config.data.cache_dir`` (default ``DIR/data``),
trains each model kind in ``config.train.models`` (Orbax checkpoints under ``DIR/ckpt/<kind>``;
an interrupted run resumes), evaluates on ``test`` (training voice) and ``test_voice2`` (another
voice and rate), and writes ``DIR/results.json`` plus the printed table.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from btlm_jax.models import quant
from btlm_jax.punctuation import config as cfg_mod
from btlm_jax.punctuation import data as data_mod
from btlm_jax.punctuation import features as feats_mod
from btlm_jax.punctuation import model as model_mod
from btlm_jax.punctuation import projection
from btlm_jax.punctuation import synth
from btlm_jax.punctuation.text import CLASSES

TEST_SPLITS = ("test", "test_voice2")


# ----------------------------------------------------------------------------- training

def make_optimizer(tcfg):
    sched = optax.warmup_cosine_decay_schedule(
        0.0, tcfg.learning_rate, min(tcfg.warmup_steps, tcfg.steps - 1) if tcfg.steps > 1 else 0,
        tcfg.steps, end_value=tcfg.learning_rate * 0.05)
    return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip),
                       optax.adamw(sched, weight_decay=tcfg.weight_decay))


def loss_fn(params, model, batch, rng, train):
    logits = model.apply({"params": params}, batch["proj"], batch["acoustic"], batch["mask"],
                         train=train, rngs={"dropout": rng} if train else {})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    m = batch["mask"].astype(jnp.float32)
    return jnp.sum(ce * m) / jnp.maximum(m.sum(), 1.0)


def make_train_step(model, tx):
    @jax.jit
    def step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], model, batch, rng, True)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                "rng": state["rng"]}, loss

    return step


def train_model(cfg, kind: str, train_records, ckpt_dir: pathlib.Path, log):
    mcfg, tcfg = cfg.model, cfg.train
    model = model_mod.from_config(mcfg, acoustic=(kind == "multimodal"), n_classes=len(CLASSES))
    L, D = cfg.data.max_words, mcfg.projection_dim
    init_rng = jax.random.key(tcfg.seed)
    # Under jit: an eager init would dispatch the scan's many small ops one by one.
    params = jax.jit(lambda k: model.init(
        k, jnp.zeros((1, L, D), jnp.int8), jnp.zeros((1, L, len(feats_mod.FEATURE_NAMES))),
        jnp.ones((1, L), bool))["params"])(init_rng)
    tx = make_optimizer(tcfg)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
             "rng": jax.random.key_data(jax.random.fold_in(init_rng, 1))}
    mngr = ocp.CheckpointManager(ckpt_dir.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=1))
    if mngr.latest_step() is not None:
        try:
            state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(state))
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise cfg_mod.ConfigError(
                f"checkpoint {ckpt_dir}/{mngr.latest_step()} does not fit the current model config "
                f"({type(e).__name__}); use a fresh --workdir or delete {ckpt_dir}") from e
        log(f"[{kind}] resumed from step {int(state['step'])}")
    ds = data_mod.train_dataset(train_records, batch_size=tcfg.batch_size, projection_dim=D,
                                max_len=L, seed=tcfg.seed)
    step_fn = make_train_step(model, tx)

    def to_dev(b):
        return {k: jnp.asarray(v) for k, v in b.items()}

    state = dict(state, rng=jax.random.wrap_key_data(state["rng"]))
    t0, losses = time.time(), []
    start = int(state["step"])
    for i in range(start, tcfg.steps):
        state, loss = step_fn(state, to_dev(ds[i]))
        losses.append(loss)
        if (i + 1) % tcfg.log_every == 0 or i + 1 == tcfg.steps:
            recent = float(jnp.mean(jnp.stack(losses[-tcfg.log_every:])))
            log(f"[{kind}] step {i + 1}/{tcfg.steps} loss {recent:.4f} "
                f"({(time.time() - t0) / (i + 1 - start) * 1000:.1f} ms/step)")
        if (i + 1) % tcfg.checkpoint_every == 0 or i + 1 == tcfg.steps:
            saved = dict(state, rng=jax.random.key_data(state["rng"]))
            mngr.save(i + 1, args=ocp.args.StandardSave(saved))
    mngr.wait_until_finished()
    mngr.close()
    final_loss = float(jnp.mean(jnp.stack(losses[-tcfg.log_every:]))) if losses else None
    return model, state["params"], {"train_time_s": time.time() - t0, "final_train_loss": final_loss,
                                    "steps": tcfg.steps}


# ----------------------------------------------------------------------------- evaluation

def forward_fn(model):
    """jit-compiled argmax prediction, one per model (cached so evaluations share compiles)."""
    fn = _FORWARD.get(id(model))
    if fn is None or fn[0] is not model:
        fn = (model, jax.jit(lambda p, pr, ac, m: jnp.argmax(
            model.apply({"params": p}, pr, ac, m, train=False), -1)))
        _FORWARD[id(model)] = fn
    return fn[1]


_FORWARD: dict = {}


def predict(model, params, records, cfg):
    fwd = forward_fn(model)
    apply = lambda p, b: fwd(p, b["proj"], b["acoustic"], b["mask"])  # noqa: E731
    preds, golds = [], []
    for b in data_mod.eval_batches(records, batch_size=cfg.eval.batch_size,
                                   projection_dim=cfg.model.projection_dim, max_len=cfg.data.max_words):
        p = np.asarray(apply(params, {k: jnp.asarray(v) for k, v in b.items()}))
        preds.append(p[b["mask"]])
        golds.append(b["labels"][b["mask"]])
    return np.concatenate(golds), np.concatenate(preds)


def classification_report(gold, pred, n_classes: int, min_support: int) -> dict:
    """Per-class precision/recall/F1 from the confusion matrix; macro-F1 over the punctuation
    classes (all but 'none') with at least ``min_support`` gold examples."""
    cm = np.bincount(gold * n_classes + pred, minlength=n_classes**2).reshape(n_classes, n_classes)
    per = {}
    for c in range(n_classes):
        tp = cm[c, c]
        p = tp / cm[:, c].sum() if cm[:, c].sum() else 0.0
        r = tp / cm[c, :].sum() if cm[c, :].sum() else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per[CLASSES[c]] = {"precision": float(p), "recall": float(r), "f1": float(f),
                           "support": int(cm[c, :].sum())}
    macro_classes = [CLASSES[c] for c in range(1, n_classes) if per[CLASSES[c]]["support"] >= min_support]
    macro = float(np.mean([per[c]["f1"] for c in macro_classes])) if macro_classes else 0.0
    return {"per_class": per, "macro_f1": macro, "macro_f1_classes": macro_classes,
            "macro_f1_all4": float(np.mean([per[c]["f1"] for c in CLASSES])),
            "accuracy": float(np.trace(cm) / max(cm.sum(), 1)), "confusion": cm.tolist()}


def quantize_int8(params):
    """Symmetric per-output-channel int8 for every matrix/conv kernel, through the package's
    weight-only quantiser (:func:`btlm_jax.models.quant.quantize`; the last axis is the output
    channel, all others are contracted); vectors stay float32.
    Returns (dequantised params, size in bytes of the int8 form)."""

    def one(x):
        x = jnp.asarray(x, jnp.float32)
        return x if x.ndim < 2 else quant.quantize(x, tuple(range(x.ndim - 1)), "int8")

    qparams = jax.tree.map(one, params)
    return quant.dequantize_params(qparams), quant.weight_bytes(qparams)


def cpu_latency(model, params, records, cfg, n: int) -> dict:
    """Per-utterance CPU latency of the deployed path: hashing projection + per-utterance
    normalisation + the model at batch 1, median and 90th percentile over ``n`` test utterances."""
    cpu = jax.devices("cpu")[0]
    params = jax.device_put(params, cpu)
    fn = forward_fn(model)
    L, D = cfg.data.max_words, cfg.model.projection_dim
    times = []
    recs = records[:n]
    for i, r in enumerate([recs[0]] + list(recs)):  # first call compiles; not timed
        t0 = time.perf_counter()
        with jax.default_device(cpu):
            b = data_mod.encode(r, projection_dim=D, max_len=L)
            out = fn(params, b["proj"][None], b["acoustic"][None], b["mask"][None])
            out.block_until_ready()
        if i:
            times.append(time.perf_counter() - t0)
    t = np.array(times) * 1000
    return {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "n": len(t)}


def feature_latency(records, cfg, n: int = 20) -> dict | None:
    """CPU time of the acoustic front end (YIN, energy, silence, per-word statistics) per
    utterance, on re-synthesised test audio; None when espeak-ng is unavailable."""
    try:
        from btlm_jax.punctuation import tts

        eng = tts.get_engine()
        eng.set_voice(cfg.data.voice, cfg.data.rate, cfg.data.pitch)
    except Exception:  # noqa: BLE001 - optional figure
        return None
    times, secs = [], []
    for r in records[:n]:
        syn = eng.synthesize(r["spoken"])
        t0 = time.perf_counter()
        feats_mod.word_features(syn.audio, syn.sample_rate, syn.word_starts)
        times.append((time.perf_counter() - t0) * 1000)
        secs.append(len(syn.audio) / syn.sample_rate)
    return {"median_ms": float(np.median(times)), "mean_audio_s": float(np.mean(secs)), "n": len(times)}


# ----------------------------------------------------------------------------- driver

def run(cfg, workdir: str | os.PathLike, *, log=print) -> dict:
    cfg = cfg_mod.validate(cfg)
    wd = pathlib.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "config.json").write_text(cfg.to_json_best_effort(indent=1))
    data_dir = pathlib.Path(cfg.data.cache_dir) if cfg.data.cache_dir else wd / "data"
    manifest = synth.build(cfg, data_dir, verbose=True)
    splits = {s: synth.load_split(data_dir, s) for s in synth.SPLITS}
    stats = json.loads(manifest.read_text())["stats"]
    log("[data] " + ", ".join(f"{s}: {len(v)} utts" for s, v in splits.items()))

    results = {"config": json.loads(cfg.to_json_best_effort()), "data": stats, "models": {}}
    for kind in cfg_mod.model_kinds(cfg):
        model, params, tinfo = train_model(cfg, kind, splits["train"], wd / "ckpt" / kind, log)
        n_params = int(sum(x.size for x in jax.tree.leaves(params)))
        deq, int8_bytes = quantize_int8(params)
        entry = {"params": n_params, "float32_bytes": 4 * n_params, "int8_bytes": int(int8_bytes),
                 **tinfo, "latency": cpu_latency(model, params, splits["test"], cfg,
                                                 cfg.eval.latency_utterances)}
        for split in TEST_SPLITS:
            gold, pred = predict(model, params, splits[split], cfg)
            rep = classification_report(gold, pred, len(CLASSES), cfg.eval.min_support)
            g8, p8 = predict(model, deq, splits[split], cfg)
            rep["int8_macro_f1"] = classification_report(g8, p8, len(CLASSES), cfg.eval.min_support)["macro_f1"]
            entry[split] = rep
        results["models"][kind] = entry
    if "multimodal" in results["models"]:
        results["acoustic_frontend_latency"] = feature_latency(splits["test"], cfg)
    if {"text", "multimodal"} <= set(results["models"]):
        results["multimodal_beats_text"] = {
            s: results["models"]["multimodal"][s]["macro_f1"] > results["models"]["text"][s]["macro_f1"]
            for s in TEST_SPLITS}
    (wd / "results.json").write_text(json.dumps(results, indent=1))
    table = format_table(results)
    (wd / "results.txt").write_text(table + "\n")
    log(table)
    return results


def format_table(results: dict) -> str:
    lines = []
    hdr = f"{'model':<11}{'test set':<13}" + "".join(
        f"{c + ' P/R/F1':>23}" for c in CLASSES[1:]) + f"{'macro-F1':>10}{'int8 F1':>9}"
    lines += [hdr, "-" * len(hdr)]
    for kind, e in results["models"].items():
        for split in TEST_SPLITS:
            r = e[split]
            cells = "".join(
                f"{'%.3f/%.3f/%.3f' % (r['per_class'][c]['precision'], r['per_class'][c]['recall'], r['per_class'][c]['f1']):>23}"
                for c in CLASSES[1:])
            lines.append(f"{kind:<11}{split:<13}{cells}{r['macro_f1']:>10.3f}{r['int8_macro_f1']:>9.3f}")
    lines.append("")
    any_e = next(iter(results["models"].values()))
    sup = {s: {c: any_e[s]["per_class"][c]["support"] for c in CLASSES} for s in TEST_SPLITS}
    lines.append("support: " + "; ".join(f"{s}: " + ", ".join(f"{c} {n}" for c, n in sup[s].items())
                                         for s in TEST_SPLITS))
    lines.append(f"macro-F1 = mean F1 over {any_e['test']['macro_f1_classes']} "
                 "(punctuation classes with enough test support)")
    lines.append("")
    lines.append(f"{'model':<11}{'params':>9}{'int8 bytes':>12}{'f32 bytes':>11}{'CPU ms/utt (median, p90)':>27}{'train s':>9}")
    for kind, e in results["models"].items():
        lat = e["latency"]
        lines.append(f"{kind:<11}{e['params']:>9}{e['int8_bytes']:>12}{e['float32_bytes']:>11}"
                     f"{'%.2f, %.2f' % (lat['median_ms'], lat['p90_ms']):>27}{e['train_time_s']:>9.0f}")
    fl = results.get("acoustic_frontend_latency")
    if fl:
        lines.append(f"acoustic front end (YIN, energy, silence): {fl['median_ms']:.1f} ms per utterance "
                     f"of {fl['mean_audio_s']:.1f} s audio")
    if "multimodal_beats_text" in results:
        lines.append("multi-modal macro-F1 > text-only: " + ", ".join(
            f"{s}: {'yes' if v else 'NO'}" for s, v in results["multimodal_beats_text"].items()))
    return "\n".join(lines)


def _main(argv):
    from absl import flags

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    FLAGS = flags.FLAGS
    try:
        run(FLAGS.config, FLAGS.workdir)
    except (cfg_mod.ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    except Exception as e:
        from btlm_jax.punctuation.tts import EspeakError

        if isinstance(e, EspeakError):
            raise SystemExit(f"error: {e}") from e
        raise


if __name__ == "__main__":
    from absl import app

    flags = synth.define_config_flag()
    flags.DEFINE_string("workdir", None, "run directory (results.json, checkpoints, data cache)")
    flags.mark_flag_as_required("workdir")
    app.run(_main)
