"""sample from a run (KV-cache decoding).

    btlm-generate --workdir=RUN --prompt=TEXT [--prompt=TEXT ...] [--max_new_tokens=64
        --temperature=0.8 --top_k=40 --top_p=0.95 --seed=0] [--quantize=int4] [--json]
    (= python -m btlm_jax.generate ...)

Decodes the prompts with a KV cache, as btlm_jax.load_model(RUN).generate does (the same code
path): prompts are batched together, or with a dynamic ALiBi scaling
(model.alibi_scaling_train_seq_len) batched by length, so each prompt's key count and slopes are
its own. --temperature=0 is greedy decoding. With --position_interpolation the ALiBi slopes are
divided by (prompt + new tokens) / L_train when that exceeds the training length. --json prints
one JSON object on the last line.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from btlm_jax import errors
from btlm_jax.cli.common import run_app, start

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat the flag for a batch.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", "", "File with one prompt per line (added to --prompt).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_TEMP = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_QUANT = flags.DEFINE_enum("quantize", "none", ["none", "int8", "int4"],
                           "Weight-only quantisation of the restored parameters.")
_GROUP = flags.DEFINE_integer("group_size", 128, "int4 group size (inputs per scale).")
_PI = flags.DEFINE_bool("position_interpolation", False,
                        "Divide ALiBi slopes by total length / L_train beyond the training length.")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1: latest).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")
errors.define_verbose_flag()


@errors.entry_point  # user errors: one `error: ...` line, exit 2 (--verbose: the traceback)
def main(argv):
    start(argv)
    from btlm_jax.api import load_model
    from btlm_jax.eval.perplexity import pi_scale, train_length
    from btlm_jax.eval.sampling import SamplingConfig

    prompts = list(_PROMPT.value)
    if _PROMPT_FILE.value:
        with open(_PROMPT_FILE.value, encoding="utf-8") as f:
            prompts += [ln.rstrip("\n") for ln in f if ln.strip()]
    if not prompts:
        raise errors.UserError("give at least one --prompt (or --prompt_file)")
    sc = SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMP.value,
                        top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
    sc.check()  # before the (slow) restore
    # the API's code path: grouping by prompt length under a dynamic alibi_scaling included
    lm = load_model(_WORKDIR.value, None if _STEP.value < 0 else _STEP.value)
    lm = lm.quantized(_QUANT.value, _GROUP.value)
    tok = lm.tokenizer
    ids = [tok.encode(p) or [tok.eos_id] for p in prompts]
    total = max(len(i) for i in ids) + sc.max_new_tokens
    trained = train_length(lm.cfg)
    warning = past_trained_length(total, trained, lm.cfg.model, _PI.value)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    scale = pi_scale(total, trained, _PI.value and lm.cfg.model.position == "alibi")
    outs = lm.generate(ids, max_new_tokens=sc.max_new_tokens, temperature=sc.temperature,
                       top_k=sc.top_k, top_p=sc.top_p, seed=sc.seed, alibi_scale=scale)
    records = []
    for p, i, o in zip(prompts, ids, outs):
        text = tok.decode(o)
        records.append({"prompt": p, "prompt_tokens": len(i), "completion": text, "tokens": o})
        print(f"--- prompt: {p!r}\n{p}{text}\n")
    if _JSON.value:
        print(json.dumps({"step": lm.step, "quantize": _QUANT.value, "alibi_scale": scale,
                          "generations": records}))


def past_trained_length(total: int, trained: int, model_cfg, interpolate: bool) -> str | None:
    """The warning for a generation longer than the length the model was trained at."""
    if total <= trained:
        return None
    what = (f"prompt + --max_new_tokens = {total} tokens exceeds the training length {trained}")
    if model_cfg.position == "learned":
        return (f"{what} (model.max_seq_len={model_cfg.max_seq_len}): positions past the training "
                "length were never trained; expect degraded text")
    if interpolate:
        return f"{what}; ALiBi slopes are interpolated (--position_interpolation)"
    return (f"{what}: ALiBi extrapolates and quality usually drops past it; consider "
            "--position_interpolation or fewer --max_new_tokens")


def run():
    run_app(main, "workdir", prog="btlm-generate")


if __name__ == "__main__":
    run()
