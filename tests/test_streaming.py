"""Weight streaming (``mesh.layout=weight_streaming``): memory flat in depth, one host copy of the
state sharded over the devices, the streamed optimizer update equal to optax's, the same losses
and evaluation as the standard layout, the overlap (``mesh.stream_overlap``) changing no number
and showing in the compiled program's data flow, and the per-step transfer count.

Multi-device checks run in a subprocess with fake CPU devices (this file doubles as the worker:
``python tests/test_streaming.py MODE OUT_JSON ...``); one worker compiles every variant once and
the tests share its output.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# muP with width multiplier 2 (hidden-matrix lr groups), weight decay 0.1 (the default), a clip
# that is active at every step, on 4 devices
STEP_OVERRIDES = {
    "model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 3, "model.n_heads": 4,
    "model.d_ff": 128, "model.mup.base_d_model": 32, "model.mup.base_d_ff": 64.0,
    "train.seq_len": 32, "train.batch_size": 8, "train.steps": 10, "optim.peak_lr": 1e-2,
    "optim.warmup_steps": 1, "optim.grad_clip": 0.05, "mesh.data": 4,
}
# (name, layout, stream_overlap, stream_update, grad_accum_steps) of the compiled-step variants
VARIANTS = [
    ("standard", "standard", "none", "device", 1),
    ("standard_2", "standard", "none", "device", 2),  # the standard layout's accumulation
    ("ws_prefetch_1", "weight_streaming", "prefetch", "device", 1),  # the default options
    ("ws_none_2", "weight_streaming", "none", "device", 2),
    ("ws_prefetch_writeback_2", "weight_streaming", "prefetch_writeback", "device", 2),
    ("ws_host_1", "weight_streaming", "prefetch", "host", 1),
]
N_STEPS = 2


def _config(preset="tiny", **over):
    from tests.helpers import preset as build

    return build(preset, **over)


def _tiny_run(cache_dir, **extra):
    """test_parallel's tiny run, 10 steps on 4 devices with clipping active every step."""
    from tests.test_parallel import tiny_overrides

    over = {"train.steps": 10, "optim.grad_clip": 0.05, "eval.every_steps": 10,
            "checkpoint.every_steps": 10, "mesh.data": 4, **extra}
    return _config("tiny", **tiny_overrides(cache_dir, **over))


# ----------------------------------------------------------------------------------------------
# The compiled program's data flow (XLA's HLO text after optimisation; the schedule is the order).


def _balanced(s: str, i: int) -> int:
    depth = 0
    for j in range(i, len(s)):
        depth += {"(": 1, ")": -1}.get(s[j], 0)
        if depth == 0:
            return j + 1
    raise ValueError(s)


def parse_hlo(text: str) -> dict:
    """``{computation: [instruction dicts]}`` in textual (scheduled) order."""
    comps, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%(\S+) \(.*\{\s*$", line)
        if m:
            cur = comps.setdefault(m.group(1), [])
            continue
        if line.startswith("}"):
            cur = None
        m = re.match(r"^\s*(ROOT )?%(\S+) = (.*)$", line) if cur is not None else None
        if not m:
            continue
        rest = m.group(3)
        op = re.compile(r"\s*([a-z][a-z0-9\-]*)\(").search(
            rest, _balanced(rest, 0) if rest.startswith("(") else 0)
        end = _balanced(rest, op.end() - 1)
        attrs = rest[end:]
        idx = re.search(r"\bindex=(\d+)", attrs)
        cur.append({"name": m.group(2), "root": bool(m.group(1)), "op": op.group(1),
                    "type": rest[:op.start()].strip(),
                    "operands": re.findall(r"%([\w.\-]+)", rest[op.end() - 1:end]),
                    "calls": re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", attrs),
                    "body": (re.findall(r"body=%([\w.\-]+)", attrs) or [None])[0],
                    "index": int(idx.group(1)) if idx else None})
    return comps


def loop_flow(text: str, skip_type: str) -> list[dict]:
    """Per while loop with matmuls in its body: how the body's outputs depend on the slices it
    reads from loop-invariant stacks (the host-resident layer stacks; ``skip_type``, the saved
    activations, excluded) and on its matmuls.

    ``prefetched``: loop-carried outputs read from a stack this iteration that no matmul of this
    iteration feeds (the next layer's weights); ``dots_on_read``: matmuls fed by a slice read this
    iteration; ``reads_before_first_dot``: stack reads the schedule places before the first
    matmul; ``dus_without_dot`` / ``dus_with_dot``: carried buffers updated in place
    (dynamic-update-slice) with a value that does not / does depend on this iteration's matmuls.
    """
    comps = parse_hlo(text)
    memo: dict = {}

    def ops_in(c):
        if c not in memo:
            memo[c] = set()
            for ins in comps.get(c, []):
                memo[c] |= {ins["op"]} | set().union(*[ops_in(x) for x in ins["calls"]])
        return memo[c]

    out = []
    for body_name in [i["body"] for c in comps.values() for i in c if i["op"] == "while"]:
        body = comps[body_name]
        by = {i["name"]: i for i in body}
        gte = {i["name"]: i["index"] for i in body if i["op"] == "get-tuple-element"
               and by.get(i["operands"][0], {}).get("op") == "parameter"}
        root = next(i for i in body if i["root"])
        invariant = {n for n, k in gte.items() if root["operands"][k] == n
                     and i_type(by[n]) != skip_type and by[n]["type"][:1] in "fb"}
        dot, read = {}, {}
        reads, first_dot = [], None
        for pos, ins in enumerate(body):
            kinds = {ins["op"]} | set().union(*[ops_in(c) for c in ins["calls"]])
            is_dot = bool(kinds & {"dot", "convolution"})
            is_read = "dynamic-slice" in kinds and any(o in invariant for o in ins["operands"])
            dot[ins["name"]] = is_dot or any(dot.get(o, False) for o in ins["operands"])
            read[ins["name"]] = is_read or any(read.get(o, False) for o in ins["operands"])
            ins["is_dot"] = is_dot
            if is_read:
                reads.append(pos)
            if is_dot and first_dot is None:
                first_dot = pos
        if first_dot is None:
            continue
        carried = [(k, by[o]) for k, o in enumerate(root["operands"]) if o not in invariant
                   and gte.get(o) != k]
        dus = [i for k, i in carried
               if "dynamic-update-slice" in {i["op"]}.union(*[ops_in(c) for c in i["calls"]])
               and any(gte.get(o) == k for o in i["operands"])]
        dus_names = {i["name"] for i in dus}
        out.append({
            "prefetched": sum(1 for _, i in carried if read[i["name"]] and not dot[i["name"]]
                              and i["name"] not in dus_names),
            "dots": sum(1 for i in body if i["is_dot"]),
            "dots_on_read": sum(1 for i in body if i["is_dot"]
                                and any(read.get(o) for o in i["operands"])),
            "reads": len(reads),
            "reads_before_first_dot": sum(1 for p in reads if p < first_dot),
            "dus_without_dot": sum(1 for i in dus if not dot[i["name"]]),
            "dus_with_dot": sum(1 for i in dus if dot[i["name"]]),
        })
    return out


def i_type(ins) -> str:
    return ins["type"].split("{")[0]


# ----------------------------------------------------------------------------------------------
# Worker modes (run in the subprocess).


def _worker_memory(out_json):
    """AOT memory of the streamed train step at 4 and 16 layers (8 fake devices), at the
    ``bench`` preset's width (d_model 1024), where the stacks that grow with depth are large
    enough to show (at ``tiny`` width fixed costs hide them). Default streaming options
    (double-buffered, device update)."""
    import jax

    from btlm_jax.train import aot

    assert len(jax.devices()) == 8
    res = {}
    for layers in (4, 16):
        c = _config("bench", **{"model.n_layers": layers, "mesh.layout": "weight_streaming",
                               "train.seq_len": 512, "train.batch_size": 8})
        info = aot.train_step_memory(c, (8, 1, 1), seq_len=512, batch_size=8)
        info["state_bytes_total"] = _state_bytes(c)
        res[f"weight_streaming_{layers}"] = info
    Path(out_json).write_text(json.dumps(res))


def _state_bytes(cfg) -> int:
    """Bytes of one full replica of parameters + optimizer state (from shapes alone)."""
    import jax
    import ml_collections

    from btlm_jax.train.program import Program

    c = ml_collections.ConfigDict(cfg.to_dict())
    c.mesh.layout, c.mesh.data = "standard", 1
    prog = Program.from_config(c, jax.devices()[:1])
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(prog.abstract_state))


def _batches(vocab, batch, seq, n):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        toks = rng.integers(0, vocab, (batch, seq + 1))
        mask = np.ones((batch, seq), np.float32)
        mask[:, : seq // 4] = 0.0  # some unmasked-out tokens, so the count matters
        out.append({"inputs": toks[:, :-1].astype(np.int32),
                    "targets": toks[:, 1:].astype(np.int32),
                    "loss_mask": mask, "segment_ids": np.ones((batch, seq), np.int32),
                    "positions": np.broadcast_to(np.arange(seq, dtype=np.int32),
                                                 (batch, seq)).copy()})
    return out


def _steps():
    """The compiled train step of every variant in ``VARIANTS`` (4 devices, muP groups, weight
    decay, clipping active) for ``N_STEPS`` steps on the same batches: metrics, and the data flow
    of the streamed loops in the compiled program; plus :func:`transfer_bytes` of the tiny run."""
    import jax

    from btlm_jax import optim
    from btlm_jax.parallel.streaming import transfer_bytes
    from btlm_jax.train.program import Program

    assert len(jax.devices()) == 4
    o = STEP_OVERRIDES
    batches = _batches(o["model.vocab_size"], o["train.batch_size"], o["train.seq_len"], N_STEPS)
    res, init = {}, {}
    for name, layout, overlap, update, accum in VARIANTS:
        c = _config("tiny", **{**o, "mesh.layout": layout, "mesh.stream_overlap": overlap,
                               "mesh.stream_update": update, "train.grad_accum_steps": accum})
        tr = Program.from_config(c)
        compiled = tr.compile_train_step(o["train.seq_len"], o["train.batch_size"])
        if layout not in init:  # one initialisation per layout (same seed: same values)
            init[layout] = jax.device_get(tr.init_state())
        state = jax.device_put(init[layout], tr.state_shardings)
        out = {"loss": [], "grad_norm": [], "param_norm": []}
        for b in batches:
            state, m = compiled(state, {k: jax.device_put(v, tr.batch_sharding)
                                        for k, v in b.items()})
            for k in out:
                out[k].append(float(m[k]))
        if layout == "weight_streaming":
            mb = o["train.batch_size"] // accum // 4
            out["flow"] = loop_flow(compiled.as_text(), f"f32[{o['model.n_layers']},{mb},"
                                    f"{o['train.seq_len']},{o['model.d_model']}]")
            tx, _ = optim.build(c, c.train.steps)
            out["bytes"] = transfer_bytes(c, tx, tr.abstract_state, 4)
        res[name] = out
    return res


def _runs(cache_dir, root):
    """A 10-step tiny run with weight streaming (default options; 4 devices, clipping active),
    then ``evaluate``'s path (load_run -> Evaluator), greedy generation and export on its run
    directory; and the reference: the same checkpoint read back in the standard layout (a copy of
    the run directory whose config says ``mesh.layout=standard``), evaluated and sampled."""
    import shutil

    import jax

    from btlm_jax.convert.workdir import export_checkpoint
    from btlm_jax.eval.perplexity import Evaluator
    from btlm_jax.eval.sampling import Generator, SamplingConfig
    from btlm_jax.eval.session import load_run
    from btlm_jax.train.loop import train

    assert len(jax.devices()) == 4
    wd = Path(root) / "weight_streaming"
    train(_tiny_run(cache_dir, **{"mesh.layout": "weight_streaming"}), str(wd))
    recs = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    std = Path(root) / "standard"
    shutil.copytree(wd, std)
    cfg = json.loads((std / "config.json").read_text())
    cfg["mesh"]["layout"] = "standard"
    (std / "config.json").write_text(json.dumps(cfg))
    res = {"loss": [r["loss"] for r in recs if "loss" in r],
           "grad_norm": [r["grad_norm"] for r in recs if "grad_norm" in r]}
    for name, path in (("weight_streaming", wd), ("standard", std)):
        run = load_run(str(path))
        tot = Evaluator(run).evaluate(32, 1.0)
        res[name] = {
            "memory_kinds": sorted({str(x.sharding.memory_kind)
                                    for x in jax.tree_util.tree_leaves(run.params)}),
            "evaluate_loss": float(tot["loss_sum"] / tot["count"]),
            "generated": Generator(run.model, run.params).generate(
                [[1, 2, 3, 4], [5, 6]], SamplingConfig(max_new_tokens=4, temperature=0))}
    exported = export_checkpoint(str(wd), str(Path(root) / "export"))
    res["exported"] = sorted(p.name for p in Path(exported).iterdir())
    return res


def _worker_streamed(out_json, cache_dir, root):
    """One JAX process on 4 devices for the step variants and the real runs."""
    Path(out_json).write_text(json.dumps({"steps": _steps(), "runs": _runs(cache_dir, root)}))


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"memory": _worker_memory, "streamed": _worker_streamed}[mode](*rest)


# ----------------------------------------------------------------------------------------------
# Tests.


def _spawn(*args, devices, timeout=900):
    from tests.helpers import spawn_script

    return spawn_script(Path(__file__).resolve(), *args, devices=devices, timeout=timeout)


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """The 4-device worker's output (compiled-step variants and real runs), run once."""
    root = tmp_path_factory.mktemp("streaming")
    cache = tmp_path_factory.getbasetemp() / "btlm_streaming_cache"
    cache.mkdir(exist_ok=True)
    _spawn("streamed", root / "out.json", cache, root, devices=4)
    return json.loads((root / "out.json").read_text())


@pytest.fixture
def steps(streamed):
    return streamed["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("name,prefetch", [("adamw", False), ("adamw_ema", True)])
def test_streamed_update_equals_optax(name, prefetch):
    """The layer-by-layer update (clip factor from the global norm, then the configured tx per
    layer slice; double-buffered or not) equals optax's one-shot chain(clip_by_global_norm,
    adamw) over two steps, with clipping active and muP groups; the norms equal a float64 NumPy
    computation."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from btlm_jax import optim
    from btlm_jax.models.btlm import BTLM
    from btlm_jax.optim.streamed import streamed_update

    c = _config("tiny", **{"model.n_layers": 3, "model.d_model": 64, "model.d_ff": 96,
                           "model.vocab_size": 128, "model.mup.base_d_model": 32,
                           "optim.grad_clip": 0.05, "optim.name": name})
    tx, _ = optim.build(c, 100)
    params = nn.unbox(BTLM(c.model).init(jax.random.PRNGKey(0),
                                         jnp.zeros((1, 8), jnp.int32))["params"])
    state = tx.init(params)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 100))
    grads = jax.tree_util.tree_map(lambda p: 3.0 * jax.random.normal(next(keys), p.shape), params)
    count = jnp.float32(7.0)
    update = jax.jit(streamed_update(tx, c.optim.grad_clip, load=lambda x: x, store=lambda x: x,
                                     prefetch=prefetch))

    @jax.jit
    def reference(p, s):
        u, s = tx.update(jax.tree_util.tree_map(lambda x: x / count, grads), s, p)
        return optax.apply_updates(p, u), s

    p_ref, s_ref, p_got, s_got = params, state, params, state
    for _ in range(2):
        p_ref, s_ref = reference(p_ref, s_ref)
        p_got, s_got, g_norm, p_norm = update(p_got, s_got, grads, count)
        g64 = [np.asarray(x, np.float64) / 7.0 for x in jax.tree_util.tree_leaves(grads)]
        np.testing.assert_allclose(float(g_norm), np.sqrt(sum((x ** 2).sum() for x in g64)),
                                   rtol=1e-5)
        np.testing.assert_allclose(float(p_norm), np.sqrt(sum(
            (np.asarray(x, np.float64) ** 2).sum() for x in jax.tree_util.tree_leaves(p_ref))),
            rtol=1e-5)
    assert float(g_norm) > 10 * c.optim.grad_clip  # clipping is active
    assert jax.tree_util.tree_structure(s_got) == jax.tree_util.tree_structure(s_ref)
    for a, b in zip(jax.tree_util.tree_leaves((p_ref, s_ref)),
                    jax.tree_util.tree_leaves((p_got, s_got))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(p_ref), jax.tree_util.tree_leaves(params)))
    assert moved > 1e-4  # the parameters did change


@pytest.mark.slow
def test_streamed_steps_equal_standard_and_overlap_changes_no_number(steps):
    """4 devices, muP groups (width multiplier 2), weight decay, clipping active every step, 1 or
    2 micro-batches: the standard layout with 2 micro-batches and every weight-streaming variant
    (the default options among them) give the losses, gradient and parameter norms of the
    standard layout with one (float32, other reduction orders); without
    overlap and with ``prefetch_writeback`` they are bit-equal (the same compute, only the
    moves issued earlier)."""
    ref = steps["standard"]
    assert ref["loss"][-1] < ref["loss"][0] and min(ref["grad_norm"]) > 0.05  # clip active
    for name, *_ in VARIANTS[1:]:
        for key in ("loss", "grad_norm", "param_norm"):
            np.testing.assert_allclose(steps[name][key], ref[key], rtol=2e-4,
                                       err_msg=f"{name}: {key}")
    base = steps["ws_none_2"]
    for key in ("loss", "grad_norm", "param_norm"):
        assert steps["ws_prefetch_writeback_2"][key] == base[key], key


@pytest.mark.slow
def test_streamed_overlap_in_compiled_data_flow(steps):
    """The compiled program (XLA:CPU, 4 devices), read as data flow: without overlap every
    matmul of a layer-loop iteration is fed by weights read from the host stack in that same
    iteration; with ``prefetch`` (1 micro-batch) and ``prefetch_writeback`` (2) none is: the
    forward and backward loops read the next layer (one slice per parameter leaf, carried out,
    issued before the iteration's first matmul in the schedule) and compute on the slices
    carried in; with ``prefetch_writeback`` the backward's gradient writes into the host buffer
    depend on no matmul of the iteration (the previous layer's gradient leaves under this
    layer's compute), with ``prefetch`` every one does."""
    leaves = 18  # per layer: ln_1, ln_2 (scale, bias), q, k, v, out, wi_0, wi_1, wo (kernel, bias)

    def split(flow, micro):  # forward loops have the fewest matmuls
        assert len(flow) == 2 * micro, flow  # forward and backward, per micro-batch
        few = min(f["dots"] for f in flow)
        return [f for f in flow if f["dots"] == few], [f for f in flow if f["dots"] > few]

    for loop in steps["ws_none_2"]["flow"]:
        assert loop["prefetched"] == 0 and loop["dots_on_read"] == loop["dots"] > 0, loop
    _, bwd_none = split(steps["ws_none_2"]["flow"], 2)
    assert all(b["dus_with_dot"] == leaves for b in bwd_none), bwd_none
    for name, micro, writes_behind in (("ws_prefetch_writeback_2", 2, True),
                                       ("ws_host_1", 1, False)):
        fwd, bwd = split(steps[name]["flow"], micro)
        assert len(fwd) == len(bwd) == micro
        for f in fwd:
            assert f["dots_on_read"] == 0 and f["prefetched"] == leaves, (name, f)
            assert f["reads_before_first_dot"] == f["reads"] == leaves, (name, f)
        for b in bwd:  # the backward never reads wo's bias: no gradient needs its value
            assert b["dots_on_read"] == 0 and b["prefetched"] == b["reads"] >= leaves - 1, b
            assert b["reads_before_first_dot"] == b["reads"], (name, b)
            assert b["dus_without_dot" if writes_behind else "dus_with_dot"] == leaves, b
            assert b["dus_with_dot" if writes_behind else "dus_without_dot"] == 0, b


@pytest.mark.slow
def test_transfer_bytes_from_shapes(steps):
    """Bytes per device per step over the host link, against the model's parameter count
    written out here (BTLM block: 2 LayerNorms, q/k/v/out projections and SwiGLU with biases;
    tied embedding and the final LayerNorm besides; every leaf splits over the 4 devices;
    AdamW: two parameter-shaped moments), with 2 micro-batches (the host update: 1)."""
    d, f, v, n, k = 64, 128, 512, 3, 2
    layer = 4 * d + 4 * (d * d + d) + 2 * (d * f + f) + f * d + d
    L, R = n * layer * 4 // 4, (v * d + 2 * d) * 4 // 4  # float32 bytes, 1/4 per device
    S = 2 * (L + R)
    one = L // n
    expect = {
        "ws_none_2": (k * (R + 2 * L) + (k - 1) * 2 * (R + L) + 3 * (R + L) + S,
                      k * (R + L) + (k - 1) * (R + L) + (R + L) + S),
        "ws_prefetch_writeback_2": (k * (R + 2 * L + one) + (k - 1) * 2 * (R + L)
                                    + 3 * (R + L) + S,
                                    k * (R + L + one) + (k - 1) * (R + L) + (R + L) + S),
        "ws_host_1": (R + 2 * L + one, R + L),
    }
    for name, (h2d, d2h) in expect.items():
        got = steps[name]["bytes"]
        assert (got["h2d"], got["d2h"]) == (h2d, d2h), (name, got, h2d, d2h)


@pytest.mark.slow
def test_streamed_memory_flat_in_depth_and_host_state_sharded(tmp_path):
    """AOT on 8 CPU devices, ``bench`` preset, seq 512, default remat (none), default streaming
    options (double-buffered): the streamed step's device memory grows at most 1.5x from 4 to 16
    layers while the state it keeps in host memory grows with the model (3.25x; the standard
    layout's device memory grows 3.15x, benchmarks/RESULTS.md); each device holds 1/8 of the
    state in host memory. (Before the per-layer move was fenced off from the stack, XLA:CPU
    relaid out each whole parameter stack for the all-gather: 1.66x; without copy-insertion
    region analysis the double-buffered optimizer loop copies each stack per iteration:
    1.54x.)"""
    out = tmp_path / "memory.json"
    _spawn("memory", out, devices=8)
    res = json.loads(out.read_text())
    ws4, ws16 = res["weight_streaming_4"], res["weight_streaming_16"]
    ws_ratio = ws16["device_total_bytes"] / ws4["device_total_bytes"]
    host_ratio = (ws16["state_bytes_per_device_in_host_memory"]
                  / ws4["state_bytes_per_device_in_host_memory"])
    assert ws_ratio <= 1.5, (ws_ratio, ws4["device_total_bytes"], ws16["device_total_bytes"])
    assert host_ratio >= 2.5, host_ratio  # 4x the layers: the model itself grows ~linearly
    for info in (ws4, ws16):
        assert info["state_bytes_per_device_on_device"] == 4  # the step counter
        host = info["state_bytes_per_device_in_host_memory"]
        assert host <= info["state_bytes_total"] / 5, (host, info["state_bytes_total"])
        # one copy over the 8 devices (only a few small leaves stay replicated)
        assert host <= info["state_bytes_total"] / 8 * 1.05


@pytest.mark.slow
def test_streamed_run_evaluates_generates_and_exports(streamed):
    """A 10-step weight-streaming run of the real training loop (4 devices, clipping active)
    trains; ``evaluate``'s path on its run directory gives the loss of the same checkpoint
    evaluated in the standard layout, greedy generation the same tokens; export writes the
    model."""
    res = streamed["runs"]
    ws, ref = res["weight_streaming"], res["standard"]
    assert len(res["loss"]) == 10 and res["loss"][-1] < res["loss"][0]
    assert min(res["grad_norm"]) > 0.05  # optim.grad_clip=0.05 clips every step
    assert ws["memory_kinds"] == ["pinned_host"] and ref["memory_kinds"] == ["device"]
    np.testing.assert_allclose(ws["evaluate_loss"], ref["evaluate_loss"], rtol=2e-5)
    assert ws["generated"] == ref["generated"] and len(ref["generated"][0]) == 4
    assert "config.json" in res["exported"] and "model.safetensors" in res["exported"]
