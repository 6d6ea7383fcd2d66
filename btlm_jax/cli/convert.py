"""Hugging Face checkpoints <-> run directories.

    btlm-convert import --hf_dir=DIR --workdir=RUN [--tokenizer=PATH]
    btlm-convert export --workdir=RUN --out=DIR [--layout=btlm|gpt2] [--dtype=bfloat16]
    (= python -m btlm_jax.convert ...; see btlm_jax/convert/)

import reads safetensors or PyTorch .bin (BTLM or GPT-2 / Cerebras-GPT layout) into a new run
directory; export writes a run's checkpoint as config.json + model.safetensors + tokenizer files.
"""

from __future__ import annotations

from absl import flags

from btlm_jax import errors
from btlm_jax.cli.common import run_app

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



@errors.entry_point  # user errors: one `error: ...` line, exit 2 (--verbose: the traceback)
def main(argv):
    from btlm_jax.convert.hf import ConversionError
    from btlm_jax.convert.workdir import export_checkpoint, import_checkpoint

    if len(argv) != 2 or argv[1] not in ("import", "export"):
        got = f"got {' '.join(argv[1:])!r}" if len(argv) > 1 else "got none"
        raise errors.UserError(f"give one command, import or export ({got}); see "
                               "btlm-convert --help")
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


def run():
    run_app(main, prog="btlm-convert")


if __name__ == "__main__":
    run()
