"""describe a config without allocating it: parameters, FLOPs, memory.

    btlm-describe --config=3b_8k [--json]           (= python -m btlm_jax.describe ...)
    btlm-describe --config=3b_8k --mesh=1,8,1 --fake_devices=8 --seq_len=8192 --batch_size=8

Prints the exact parameter count (from jax.eval_shape), training FLOPs per token, and the bytes of
parameters and optimizer state; --mesh also compiles the train step ahead of time and prints
per-device memory. --json prints the same as one JSON object on the last line.
"""

from __future__ import annotations

import json

from absl import flags

from btlm_jax import errors
from btlm_jax.cli.common import run_app
from btlm_jax.cli.overrides import define_config_flag

with errors.cli():  # a misspelt --config.KEY override fails here, while the flag is defined
    _CONFIG = define_config_flag()  # the one --config flag definition
errors.define_verbose_flag()
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")
_MESH = flags.DEFINE_string(
    "mesh", None, "DATA,FSDP,TENSOR: also compile the train step ahead of time for this mesh and "
    "print per-device memory (btlm_jax/train/aot.py).")
_FAKE_DEVICES = flags.DEFINE_integer(
    "fake_devices", 0, "With --mesh: compile for this many fake (CPU) devices instead of the "
    "machine's real ones.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "With --mesh: the phase to compile (default: "
                                "the longest sequence length).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "With --mesh: global batch (default: the phase's).")



@errors.entry_point  # user errors: one `error: ...` line, exit 2 (--verbose: the traceback)
def main(argv):
    del argv
    if _MESH.value and _FAKE_DEVICES.value:
        from btlm_jax.train.aot import use_fake_devices

        use_fake_devices(_FAKE_DEVICES.value)  # before anything initialises a JAX backend
    from btlm_jax.describe import describe

    info = describe(_CONFIG.value)
    gib = 1024 ** 3
    print(f"parameters:            {info['num_params']:,} "
          f"({info['num_non_embedding_params']:,} non-embedding)")
    for seq, f in info["flops_per_token_by_phase"].items():
        print(f"train FLOPs / token:   {f:.4g} at seq_len {seq}")
    print(f"parameter bytes:       {info['param_bytes']:,} ({info['param_bytes'] / gib:.2f} GiB)")
    print(f"optimizer state bytes: {info['optimizer_state_bytes']:,} "
          f"({info['optimizer_state_bytes'] / gib:.2f} GiB)")
    print("inference weight bytes: " + ", ".join(
        f"{k} {v:,} ({v / 1e9:.2f} GB)" for k, v in info["weight_bytes_by_format"].items())
        + f" [int4: groups of {info['int4_group_size']}]")
    if _MESH.value:
        from btlm_jax.train import aot

        info["aot"] = aot.train_step_memory(
            _CONFIG.value, aot.parse_mesh(_MESH.value), seq_len=_SEQ_LEN.value or None,
            batch_size=_BATCH.value or None)
        print(aot.format_report(info["aot"]))
        print(_attention_advice(_CONFIG.value, info["aot"]))
    if _JSON.value:
        print(json.dumps(info))


def _attention_advice(cfg, aot_info: dict) -> str:
    """Which ``model.attention`` the compiled step used and whether another fits better (README:
    Attention implementations); ``auto`` is resolved for the backend and devices it compiled on."""
    from btlm_jax.models.attention import resolve

    impl, seq_len = cfg.model.attention, aot_info["seq_len"]
    used = resolve(impl, cfg.model.dtype, seq_len, backend=aot_info["backend"],
                   num_devices=aot_info["num_devices"])
    what = impl if used == impl else f"{impl} (here: {used})"
    if seq_len >= 2048 and used == "xla":
        return (f"  attention: model.attention={what} materialises [T, T] scores at seq {seq_len};"
                " use --config.model.attention=flash (CPU/TPU) or pallas (NVIDIA GPU)")
    return f"  attention: model.attention={what}"


def run():
    run_app(main, prog="btlm-describe")


if __name__ == "__main__":
    run()
