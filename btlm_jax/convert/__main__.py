"""``python -m btlm_jax.convert import|export ...`` (see :mod:`btlm_jax.convert`)."""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

from btlm_jax import errors

_HF_DIR = flags.DEFINE_string("hf_dir", None, "import: Hugging Face checkpoint directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (import: created; export: read).")
_OUT = flags.DEFINE_string("out", None, "export: output directory for config.json + model.safetensors.")
_LAYOUT = flags.DEFINE_enum("layout", None, ["btlm", "gpt2"], "export: layout (default: by model).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "export: tensor dtype (default: the parameters' dtype).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "import: tokenizer file or directory (tokenizer.json, GPT-2 vocab.json + "
    "merges.txt, sentencepiece .model) or 'bytes'; default: HF_DIR's own tokenizer files.")
_STEP = flags.DEFINE_integer("step", -1, "export: checkpoint step (-1: latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "export: write into a non-empty --out.")
errors.define_verbose_flag()

USAGE = ("usage: python -m btlm_jax.convert import --hf_dir=DIR --workdir=RUN [--tokenizer=PATH]\n"
         "       python -m btlm_jax.convert export --workdir=RUN --out=DIR [--layout=btlm|gpt2]")


def import_checkpoint(hf_dir: str, workdir: str, tokenizer: str = "") -> dict:
    """Writes a run directory holding the Hugging Face checkpoint as step 0 (fresh optimizer)."""
    import jax
    import jax.numpy as jnp

    from btlm_jax.config import default_config
    from btlm_jax.convert import hf
    from btlm_jax.data.tokenizer import TokenizerError, load_tokenizer
    from btlm_jax.train.program import Program
    from btlm_jax.train.run_dir import RunDir
    from btlm_jax.train.step import TrainState

    wd = Path(workdir)
    if (wd / "checkpoints").exists() and any((wd / "checkpoints").iterdir()):
        raise hf.ConversionError(f"{wd} already holds checkpoints; import into a new --workdir")
    tok = tokenizer or str(hf_dir)  # the folder's tokenizer.json or vocab.json + merges.txt
    try:
        tok_obj = load_tokenizer(tok)
    except TokenizerError as e:
        raise hf.ConversionError(
            f"no tokenizer: {e}. Pass --tokenizer=PATH (a tokenizer.json, a folder with "
            "vocab.json + merges.txt, or a sentencepiece .model matching the checkpoint's "
            "vocabulary)") from None
    cfg, params, layout = hf.load_hf(hf_dir, default_config())
    m = cfg.model
    # the tokenizer's files are pinned into RUN/tokenizer/ by RunDir.create
    cfg.data.tokenizer = tok if tok == "bytes" else str(Path(tok).absolute())
    seq = int(m.train_seq_len) or min(int(m.max_seq_len), 2048)
    cfg.train.seq_len = min(seq, int(m.max_seq_len)) if m.position == "learned" else seq
    if m.position == "alibi" and not int(m.train_seq_len):
        m.train_seq_len = int(m.max_seq_len)  # the HF config's context length
    run = RunDir.create(wd, cfg, tok_obj)
    program = Program.from_config(run.cfg)
    params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, params),
                            program.state_shardings.params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=program.init_opt_state(params))
    ckpt = run.checkpointer()
    ckpt.save(0, state, {"phase": None, "iterator": None, "tokens_per_source": {},
                         "imported_from": str(Path(hf_dir).absolute()), "layout": layout},
              force=True)
    ckpt.close()
    return {"workdir": str(wd.absolute()), "layout": layout, "num_params": program.num_params}


def _nonfinite(params) -> tuple[str, int] | None:
    """The first parameter holding NaN/inf values, and how many it holds."""
    import jax
    import jax.numpy as jnp

    counts = jax.tree_util.tree_map(lambda x: jnp.sum(~jnp.isfinite(x)), params)
    for path, n in jax.tree_util.tree_flatten_with_path(jax.device_get(counts))[0]:
        if int(n):
            return jax.tree_util.keystr(path), int(n)
    return None


def export_checkpoint(workdir: str, out: str, layout: str | None = None, dtype: str | None = None,
                      step: int | None = None, overwrite: bool = False) -> Path:
    from btlm_jax.convert import hf
    from btlm_jax.eval.session import load_run

    o = Path(out)
    if o.exists() and not o.is_dir():
        raise hf.ConversionError(f"--out={out} is a file; give a directory")
    if o.is_dir() and any(o.iterdir()) and not overwrite:
        held = ", ".join(sorted(q.name for q in o.iterdir())[:5])
        raise hf.ConversionError(
            f"--out={out} is not empty (it holds {held}); choose another --out, or pass "
            "--overwrite to replace the files there")
    run = load_run(workdir, step)
    bad = _nonfinite(run.params)
    if bad:
        raise hf.ConversionError(
            f"checkpoint step {run.step} of {workdir} has non-finite weights ({bad[1]} NaN/inf "
            f"values in {bad[0]}): the run diverged at or before that step; export an earlier "
            "step with --step=N (see its checkpoints/ directory)")
    # the run's pinned tokenizer files (vocab.json + merges.txt, tokenizer.json ...) go next to
    # the weights
    return hf.save_hf(run.params, run.cfg.model, out, layout, dtype=dtype,
                      eos_token_id=run.tokenizer.eos_id, tokenizer=run.tokenizer)


@errors.entry_point  # user errors: one `error: ...` line, exit 2 (--verbose: the traceback)
def main(argv):
    from btlm_jax.convert.hf import ConversionError

    logging.set_verbosity(logging.WARNING)
    if len(argv) != 2 or argv[1] not in ("import", "export"):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    if argv[1] == "import":
        if not _HF_DIR.value or not _WORKDIR.value:
            raise ConversionError("import needs --hf_dir and --workdir")
        info = import_checkpoint(_HF_DIR.value, _WORKDIR.value, _TOKENIZER.value)
        print(f"imported {_HF_DIR.value} ({info['layout']} layout, {info['num_params']:,} "
              f"parameters) into {info['workdir']}")
    else:
        if not _WORKDIR.value or not _OUT.value:
            raise ConversionError("export needs --workdir and --out")
        path = export_checkpoint(_WORKDIR.value, _OUT.value, _LAYOUT.value, _DTYPE.value,
                                 None if _STEP.value < 0 else _STEP.value, _OVERWRITE.value)
        names = ", ".join(sorted(q.name for q in path.iterdir() if q.is_file()))
        print(f"wrote {path}: {names}")


if __name__ == "__main__":
    app.run(main)
