"""The config schema: defaults for every key, and validation with errors that name the bad key.

Every experiment is a config file in ``configs/`` returning a ``ConfigDict`` built on
:func:`default_config`, plus command-line overrides (``--config.train.steps=200``).
The default ``ConfigDict`` is *locked*: an override of a key that does not exist fails at start
with ml-collections' error naming the key (we re-raise it with the list of valid keys).
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

CONFIG_SECTIONS = ("model", "optim", "train", "data", "eval", "checkpoint", "mesh", "logging")


class ConfigError(ValueError):
    """A config value is invalid. The message names the key and says what to do."""


# The default rule table (``mesh.rules``): logical axis -> mesh axes, "name=axis[+axis]" (empty
# right-hand side = replicated). ``act_*`` name activation axes, the rest parameter axes.
DEFAULT_MESH_RULES: tuple[str, ...] = (
    "act_batch=data+fsdp", "act_length=", "act_embed=", "act_heads=tensor", "act_mlp=tensor",
    "act_vocab=tensor",
    "vocab=tensor", "embed=fsdp", "heads=tensor", "kv=", "mlp=tensor", "norm=", "layers=",
)


def default_model() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.vocab_size = 8192
    m.d_model = 256
    m.n_layers = 4
    m.n_heads = 4
    m.d_ff = 683  # SwiGLU hidden width (BTLM: 8/3 * d_model, rounded)
    # Physical alignment: the vocabulary and d_ff arrays are rounded up to a multiple of this
    # (zero rows/columns that stay exactly zero in training; padded logits are sliced off before
    # any consumer). The logical model (vocab_size, d_ff, parameter counts, FLOPs, exports) is
    # unchanged. 1 = no padding. See models/btlm.py "Physical padding".
    m.pad_multiple = 128
    m.activation = "swiglu"  # swiglu | gelu (exact) | gelu_tanh (GPT-2 "gelu_new")
    m.position = "alibi"  # alibi | learned
    m.max_seq_len = 2048  # learned positions: table size; alibi: informational
    m.alibi_scaling = 1.0  # fixed ALiBi slope divisor (HF btlm `alibi_scaling` factor)
    # HF btlm `alibi_scaling: {"type": "linear", "train_seq_len": L}` (dynamic): every forward
    # with more than L keys divides the slopes by keys / L (0 = off; see models/alibi.py)
    m.alibi_scaling_train_seq_len = 0
    # ALiBi slopes carried from a checkpoint (one float per head, e.g. the bf16-rounded
    # slopes of cerebras/btlm-3b-8k-base); empty = the standard slopes computed from n_heads
    m.alibi_slopes = ()
    m.train_seq_len = 0  # length the model was trained at (0: train.seq_len); used by PI
    m.layer_norm_eps = 1e-5
    m.use_bias = True  # biases on QKV / attention output / FFN (BTLM, GPT-2)
    m.tie_embeddings = True
    # muP (Yang et al.; BTLM's settings). With mup.enabled=False the model is standard
    # parametrisation: 1/sqrt(d_head) attention scale, no multipliers, init_std unscaled.
    m.mup = ml_collections.ConfigDict()
    m.mup.enabled = True
    m.mup.base_d_model = 256
    m.mup.base_d_ff = 682.6666666666666  # BTLM: 8/3 * 256
    m.mup.embed_mult = 14.6
    m.mup.output_mult = 2.22
    m.init_std = 0.073  # base init sigma (truncated normal at 2 sigma)
    m.scan_layers = True
    # none | minimal | minimal_flash | full | offload | save_qkv | save_attention_out |
    # save_qkv_attention_out (the save_* policies keep the activations the model tags with
    # checkpoint_name; minimal_flash = minimal + the attention output and log-sum-exp)
    m.remat = "none"
    m.dtype = "float32"  # compute dtype
    m.param_dtype = "float32"
    # auto | xla (dense jax.nn.dot_product_attention) | cudnn (fused causal cuDNN, ALiBi folded
    # into the head dimension; data.packing=concat only) | flash (blockwise JAX) | pallas
    # (kernel); auto picks from a measured table by backend, dtype and length (xla off GPUs);
    # see btlm_jax/models/attention.py and the README's "Attention implementations"
    m.attention = "auto"
    # flash blocks; pallas takes its blocks from attention.pallas_blocks (dtype, head dim,
    # length, shared memory) and uses these as upper bounds
    m.attention_block_q = 512
    m.attention_block_k = 512
    m.loss_chunk_size = 0  # >0: chunked cross-entropy over the sequence
    return m


def default_optim() -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.name = "adamw"  # adamw | adamw_ema (same numbers; the EMA form exposes timescales)
    o.peak_lr = 3e-3
    o.warmup_steps = 20
    o.schedule = "d2z"
    o.decay_ratio = 10.0  # for *_10x schedules: final lr = peak / decay_ratio
    o.final_lr = -1.0  # linear/cosine end value; <0 means derived from the schedule name
    o.cooldown_fraction = 0.2  # wsd
    o.step_fractions = (0.5, 0.75)  # step schedule
    o.step_factor = 0.1
    o.weight_decay = 0.1
    o.independent_weight_decay = False  # theta *= 1 - lambda_t instead of 1 - eta_t * lambda
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.grad_clip = 1.0
    o.mup_lr_scaling = True  # hidden matrices get lr / width_mult (only if model.mup.enabled)
    return o


def default_train() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.steps = 200
    t.batch_size = 8  # global batch (sequences per optimizer step)
    t.seq_len = 256
    t.grad_accum_steps = 1
    t.log_every_steps = 10
    # Variable sequence length: a tuple of "seq_len:batch_size:steps" strings (BTLM:
    # ("2048:1920:119727", "8192:480:39909")). Empty = one phase from seq_len/batch_size/steps.
    t.phases = ()
    # Divergence (btlm_jax/train/guard.py): a step whose loss, gradient norm or parameter norm is
    # not finite, or whose loss exceeds max_loss_spike x the mean of the last good losses (0 = no
    # spike check), is bad; a checkpoint is good once the loss computed from its weights (the
    # next step's) is good. on_divergence: stop (naming the newest good checkpoint) or rollback
    # (PaLM: restore the newest good checkpoint at least rollback_back_steps steps before the bad
    # step, skip rollback_skip_batches batches from there, at least up to the bad step's batch,
    # and continue with the step counter, schedule and optimizer counts of that checkpoint).
    t.max_loss_spike = 0.0
    t.on_divergence = "stop"
    t.rollback_back_steps = 100
    t.rollback_skip_batches = 200
    return t


def default_data() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.train = ""  # glob(s) of shards, comma separated; empty = embedded sample corpus
    d.eval = ""  # glob(s) for evaluation; empty = the sample corpus' holdout split
    d.cache_dir = ""  # empty = ~/.cache/btlm_jax
    d.tokenizer = ""  # path to .model or tokenizer.json; empty = train a sentencepiece model
    d.tokenizer_type = "bpe"  # bpe | unigram (when training one)
    d.packing = "concat"  # concat | document
    d.mixture = ""  # "src=w,src=w" or a preset name (see btlm_jax.data.mixtures); empty = natural
    d.source_field = "meta.redpajama_set_name"
    d.on_error = "raise"  # raise | skip
    # Grain worker processes (0 = in process): they tokenize the corpus when the packed store is
    # built, and read (and transform) the training batches (mp_prefetch)
    d.num_workers = 0
    d.prefetch = 2  # training batches read ahead by Grain's prefetch threads (0 = none)
    # user grain.MapDataset transforms of the training rows: ("module:function", ...), see
    # btlm_jax/data/transforms.py
    d.transforms = ()
    return d


def _validate_data(d: ml_collections.ConfigDict) -> None:
    for key in ("num_workers", "prefetch"):
        v = d[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"data.{key}={v!r}: must be an integer >= 0")
    tf = d.transforms
    if isinstance(tf, str) or not all(isinstance(x, str) and x.strip() for x in tf):
        raise ConfigError(f"data.transforms={tf!r}: must be a tuple of 'module:function' "
                          "strings, e.g. ('mytransforms:no_loss_on_digits',)")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = default_model()
    c.optim = default_optim()
    c.train = default_train()
    c.data = default_data()

    e = c.eval = ml_collections.ConfigDict()
    e.every_steps = 50
    e.num_batches = 4
    e.batch_size = 8
    # lm-evaluation-harness tasks at evaluation steps on the live parameters (btlm_jax.harness):
    e.harness_tasks = ""  # comma-separated lm_eval task names; empty = off
    e.harness_include_path = ""  # directory of extra task YAMLs
    e.harness_limit = 0  # documents per task (0 = all)

    k = c.checkpoint = ml_collections.ConfigDict()
    k.every_steps = 100
    k.keep = 3
    k.async_save = True

    ms = c.mesh = ml_collections.ConfigDict()
    ms.data = -1
    ms.fsdp = 1
    ms.tensor = 1
    ms.layout = "standard"  # standard | weight_streaming
    # weight streaming (btlm_jax/parallel/streaming.py): how the layer moves overlap the compute
    # (none | prefetch | prefetch_writeback) and where the optimizer update runs (device | host)
    ms.stream_overlap = "prefetch"
    ms.stream_update = "device"
    ms.dcn_data = 0  # data-axis size across slices/nodes (0 = auto: TPU slices, else 1)
    ms.rules = DEFAULT_MESH_RULES  # see btlm_jax/parallel/sharding.py

    lg = c.logging = ml_collections.ConfigDict()
    lg.tensorboard = True
    lg.progress_bar = True
    lg.measure_peak = True  # measure a matmul peak once per process for mfu_measured
    lg.wandb = False  # a Weights & Biases sink (pip install 'btlm_jax[wandb]')
    lg.wandb_project = "btlm_jax"
    lg.wandb_mode = "auto"  # auto (online if logged in, else offline) | online | offline
    return c


_CHOICES = {
    "model.activation": ("swiglu", "gelu", "gelu_tanh"),
    "model.position": ("alibi", "learned"),
    "model.remat": ("none", "minimal", "minimal_flash", "full", "offload", "save_qkv",
                    "save_attention_out", "save_qkv_attention_out"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention": ("auto", "xla", "cudnn", "flash", "pallas"),
    "optim.name": ("adamw", "adamw_ema"),
    "data.packing": ("concat", "document"),
    "train.on_divergence": ("stop", "rollback"),
    "data.on_error": ("raise", "skip"),
    "data.tokenizer_type": ("bpe", "unigram"),
    "mesh.layout": ("standard", "weight_streaming"),
    "mesh.stream_overlap": ("none", "prefetch", "prefetch_writeback"),
    "mesh.stream_update": ("device", "host"),
    "logging.wandb_mode": ("auto", "online", "offline"),
}

_POSITIVE_INTS = (
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.d_ff",
    "model.max_seq_len", "model.attention_block_q", "model.attention_block_k",
    "model.pad_multiple",
    "train.steps", "train.batch_size", "train.seq_len",
    "train.grad_accum_steps", "train.log_every_steps", "eval.every_steps", "eval.num_batches",
    "eval.batch_size", "checkpoint.every_steps", "checkpoint.keep",
)


def _get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def parse_phases(cfg: ml_collections.ConfigDict) -> list[tuple[int, int, int]]:
    """Returns the training phases as (seq_len, batch_size, steps) tuples."""
    if not cfg.train.phases:
        return [(int(cfg.train.seq_len), int(cfg.train.batch_size), int(cfg.train.steps))]
    phases = []
    for i, p in enumerate(cfg.train.phases):
        try:
            if isinstance(p, str):
                seq, bs, st = (int(x) for x in p.split(":"))
            else:
                seq, bs, st = (int(x) for x in p)
        except (ValueError, TypeError):
            raise ConfigError(
                f"train.phases[{i}]={p!r}: each phase must be 'seq_len:batch_size:steps', "
                "e.g. '2048:1920:119727'") from None
        if min(seq, bs, st) <= 0:
            raise ConfigError(f"train.phases[{i}]={p!r}: all of seq_len, batch_size, steps must be > 0")
        phases.append((seq, bs, st))
    return phases


def phase_of(phases: list[tuple[int, int, int]], step: int) -> int:
    """Index of the phase that the step with ``step`` completed steps belongs to (the last phase
    for steps past the end)."""
    end = 0
    for i, (_, _, n) in enumerate(phases):
        end += n
        if step < end:
            return i
    return len(phases) - 1


def _validate_model(cfg: ml_collections.ConfigDict) -> None:
    """The checks of the ``model`` section (and its ties to other sections)."""
    m = cfg.model
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if m.alibi_scaling <= 0:
        raise ConfigError(f"model.alibi_scaling={m.alibi_scaling}: must be > 0")
    dyn = m.alibi_scaling_train_seq_len
    if not isinstance(dyn, int) or isinstance(dyn, bool) or dyn < 0:
        raise ConfigError(f"model.alibi_scaling_train_seq_len={dyn!r}: must be an integer >= 0 "
                          "(0 = no dynamic ALiBi scaling)")
    if dyn and m.alibi_scaling != 1.0:
        raise ConfigError(
            f"model.alibi_scaling={m.alibi_scaling} and model.alibi_scaling_train_seq_len={dyn}: "
            "a fixed and a dynamic ALiBi scaling exclude each other; set one of them")
    if m.alibi_slopes:
        sl = tuple(m.alibi_slopes)
        if len(sl) != m.n_heads or not all(
                isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in sl):
            raise ConfigError(
                f"model.alibi_slopes has {len(sl)} values: give {m.n_heads} positive floats "
                "(one per head, model.n_heads) or () for the standard slopes")
    if m.attention == "cudnn" and cfg.data.packing != "concat":
        raise ConfigError(
            f"model.attention=cudnn with data.packing={cfg.data.packing!r}: cuDNN masks by index "
            "(causal), not by document; use model.attention=pallas (GPU) or flash for packed "
            "documents, or data.packing=concat")
    if m.mup.enabled and (m.mup.base_d_model <= 0 or m.mup.base_d_ff <= 0):
        raise ConfigError("model.mup.base_d_model and model.mup.base_d_ff must be > 0")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a config; raises ConfigError naming the offending key. Returns cfg."""
    for key in _POSITIVE_INTS:
        v = _get(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{key}={v!r}: must be a positive integer")
    for key, choices in _CHOICES.items():
        v = _get(cfg, key)
        if v not in choices:
            raise ConfigError(f"{key}={v!r}: must be one of {', '.join(choices)}")
    for key in ("train.rollback_back_steps", "train.rollback_skip_batches"):
        v = _get(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{key}={v!r}: must be an integer >= 0")
    _validate_data(cfg.data)
    spike = cfg.train.max_loss_spike
    if isinstance(spike, bool) or not isinstance(spike, (int, float)) or not spike >= 0 or (
            0 < spike <= 1):
        raise ConfigError(f"train.max_loss_spike={spike!r}: must be 0 (off) or a ratio > 1, "
                          "e.g. 3.0")
    _validate_model(cfg)
    m, o = cfg.model, cfg.optim
    if o.peak_lr <= 0 or not math.isfinite(o.peak_lr):
        raise ConfigError(f"optim.peak_lr={o.peak_lr}: must be a positive finite number")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps}: must be >= 0")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={o.weight_decay}: must be >= 0")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        raise ConfigError(f"optim.b1={o.b1}, optim.b2={o.b2}: must be in [0, 1)")
    if o.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 disables clipping)")
    from btlm_jax.optim import schedules  # local import: optim depends on nothing here

    if o.schedule not in schedules.SCHEDULES:
        raise ConfigError(
            f"optim.schedule={o.schedule!r}: must be one of {', '.join(sorted(schedules.SCHEDULES))}")
    phases = parse_phases(cfg)
    total = sum(p[2] for p in phases)
    if cfg.train.phases and total != cfg.train.steps:
        raise ConfigError(
            f"train.steps={cfg.train.steps} but train.phases add up to {total} steps: "
            "set train.steps to the sum of the phases' steps")
    if o.warmup_steps > total:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} exceeds the run's {total} steps")
    for seq, bs, _ in phases:
        if bs % cfg.train.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={bs} is not divisible by train.grad_accum_steps="
                f"{cfg.train.grad_accum_steps}")
        if m.position == "learned" and seq > m.max_seq_len:
            raise ConfigError(
                f"train.seq_len={seq} exceeds model.max_seq_len={m.max_seq_len} "
                "(learned positions have a fixed table)")
    for ax in ("data", "fsdp", "tensor"):
        v = cfg.mesh[ax]
        if not isinstance(v, int) or (v <= 0 and v != -1):
            raise ConfigError(f"mesh.{ax}={v!r}: must be a positive integer or -1 (fill)")
    if [cfg.mesh[a] for a in ("data", "fsdp", "tensor")].count(-1) > 1:
        raise ConfigError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    return cfg
