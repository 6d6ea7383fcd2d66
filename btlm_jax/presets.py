"""BTLM and Cerebras-GPT presets, shipped with the package.

Usage: ``btlm-train --config=PRESET --workdir=DIR [--config.train.steps=200 ...]`` from any
directory (a bare preset name means this module), or, in the repository, the same presets through
the config file ``--config=configs/btlm.py:PRESET`` (a shim importing this module). Presets:

- ``tiny``: the CPU default for the main job (d_model 256 = the muP base width, 4 layers).
- ``3b_8k``: BTLM-3B-8K exactly as published (Cerebras model card / configs params_btlm_2p7b_*):
  d_model 2560, 32 layers, 32 heads, SwiGLU 6826, vocab 50257, ALiBi, muP (w = 10), AdamW
  (0.9, 0.95, 1e-8, wd 0.1, clip 1.0), warmup 95 steps to 1.2e-2 then linear decay to 1.0e-4,
  phases 2048 x 1920 for 119,727 steps then 8192 x 480 for 39,909 steps.
- ``cerebras_gpt_111m`` ... ``cerebras_gpt_13b``: the Cerebras-GPT family (GPT-3 style: learned
  positions, GELU MLP with 4x width, standard parametrisation, init std 0.02); dimensions, peak LRs
  and batch sizes from the Cerebras-GPT paper's model table (Dey et al., 2023).
- ``slimpajama_dc_1p3b``: the 1.3B model of SlimPajama-DC (Shen et al., 2023): Cerebras-GPT 1.3B
  dimensions with ALiBi and SwiGLU, seq 2048.
- ``bench``: the throughput benchmark's default (``benchmarks/train_step.py``): a BTLM-shaped
  width-1024 model (4 layers, 8 heads of 128, SwiGLU 2730, vocab 16384, muP w = 4) at 1 x 512
  tokens per step, about 0.2 TFLOP per step: a few seconds on a 2-core CPU.
"""

from btlm_jax.config import default_config

# name: (d_model, n_layers, n_heads, d_ff, peak_lr, batch_size)
CEREBRAS_GPT = {
    "111m": (768, 10, 12, 3072, 6.0e-4, 120),
    "256m": (1088, 14, 17, 4352, 6.0e-4, 264),
    "590m": (1536, 18, 12, 6144, 2.0e-4, 264),
    "1p3b": (2048, 24, 16, 8192, 2.0e-4, 528),
    "2p7b": (2560, 32, 32, 10240, 2.0e-4, 528),
    "6p7b": (4096, 32, 32, 16384, 1.2e-4, 1040),
    "13b": (5120, 40, 40, 20480, 1.2e-4, 720),
}
_CGPT_ALIASES = {"1.3b": "1p3b", "2.7b": "2p7b", "6.7b": "6p7b"}


def _shape(c, vocab, d_model, n_layers, n_heads, d_ff, max_seq_len):
    m = c.model
    m.vocab_size, m.max_seq_len = vocab, max_seq_len
    m.d_model, m.n_layers, m.n_heads, m.d_ff = d_model, n_layers, n_heads, d_ff
    return m


def _schedule(c, peak_lr, warmup_steps, schedule, *, batch_size, seq_len, steps,
              eval_every=None, checkpoint_every=None):
    o = c.optim
    o.peak_lr, o.warmup_steps, o.schedule = peak_lr, warmup_steps, schedule
    t = c.train
    t.batch_size, t.seq_len, t.steps = batch_size, seq_len, steps
    if eval_every:
        c.eval.every_steps = eval_every
    if checkpoint_every:
        c.checkpoint.every_steps = checkpoint_every
    return o


def _gpt3_style(c):
    """Standard parametrisation, init std 0.02, bf16 compute (Cerebras-GPT, SlimPajama-DC)."""
    m = c.model
    m.mup.enabled = False
    m.init_std = 0.02
    m.dtype = "bfloat16"
    c.optim.mup_lr_scaling = False


def _tiny(c):
    _shape(c, 4096, 256, 4, 4, 683, 2048)
    _schedule(c, 6e-3, 20, "d2z", batch_size=8, seq_len=256, steps=200, eval_every=50,
              checkpoint_every=50)
    c.eval.num_batches = 4
    return c


def _btlm_3b_8k(c):
    m = _shape(c, 50257, 2560, 32, 32, 6826, 8192)
    m.train_seq_len = 2048
    m.mup.base_d_model = 256
    m.mup.base_d_ff = 682.6666666666666
    m.mup.embed_mult = 14.6
    m.mup.output_mult = 2.22
    m.init_std = 0.073
    m.remat = "full"
    m.dtype = "bfloat16"
    o = _schedule(c, 1.2e-2, 95, "linear", batch_size=1920, seq_len=2048,
                  steps=119727 + 39909, eval_every=5000, checkpoint_every=1000)
    o.final_lr = 1.0e-4
    o.weight_decay = 0.1
    o.b1, o.b2, o.eps, o.grad_clip = 0.9, 0.95, 1e-8, 1.0
    c.train.phases = ("2048:1920:119727", "8192:480:39909")
    c.mesh.data, c.mesh.fsdp = 1, -1
    return c


def _cerebras_gpt(c, size):
    d, n_layers, n_heads, d_ff, lr, batch = CEREBRAS_GPT[size]
    m = _shape(c, 50257, d, n_layers, n_heads, d_ff, 2048)
    m.position = "learned"
    m.activation = "gelu"
    _gpt3_style(c)
    o = _schedule(c, lr, 375, "linear_10x", batch_size=batch, seq_len=2048, steps=100_000,
                  eval_every=5000, checkpoint_every=1000)
    o.weight_decay = 0.1
    o.b1, o.b2, o.eps, o.grad_clip = 0.9, 0.95, 1e-8, 1.0
    return c


def _slimpajama_dc_1p3b(c):
    _shape(c, 50257, 2048, 24, 16, 5461, 2048)
    _gpt3_style(c)
    # ~60B tokens at 2M tokens per step
    _schedule(c, 2.0e-4, 375, "linear_10x", batch_size=1024, seq_len=2048, steps=28_600,
              eval_every=2000, checkpoint_every=1000)
    return c


def _bench(c):
    _shape(c, 16384, 1024, 4, 8, 2730, 2048)
    _schedule(c, 6e-3, 10, "d2z", batch_size=1, seq_len=512, steps=100)
    return c


PRESETS = ("tiny", "bench", "3b_8k", "slimpajama_dc_1p3b",
           *(f"cerebras_gpt_{k}" for k in CEREBRAS_GPT))


def get_config(preset: str = "tiny"):
    c = default_config()
    key = preset.strip().lower()
    if key == "tiny":
        return _tiny(c)
    if key in ("3b_8k", "btlm_3b_8k"):
        return _btlm_3b_8k(c)
    if key == "slimpajama_dc_1p3b":
        return _slimpajama_dc_1p3b(c)
    if key == "bench":
        return _bench(c)
    if key.startswith("cerebras_gpt_"):
        size = key[len("cerebras_gpt_"):]
        size = _CGPT_ALIASES.get(size, size)
        if size in CEREBRAS_GPT:
            return _cerebras_gpt(c, size)
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
