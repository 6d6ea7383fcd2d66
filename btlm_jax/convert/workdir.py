"""Hugging Face checkpoints <-> run directories: import as step 0 of a new run, export a run.

The command is ``python -m btlm_jax.convert import|export`` (:mod:`btlm_jax.cli.convert`).
"""

from __future__ import annotations

from pathlib import Path


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
