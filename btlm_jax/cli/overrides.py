"""Config overrides, parsed exactly as ``python -m btlm_jax.main`` parses them.

A sweep cell is ``--config=FILE[:ARG]`` plus ``--config.KEY=VALUE`` strings. They are parsed by
an ``absl`` ``FlagValues`` holding the same ``ml_collections`` config-file flag that
``btlm_jax.main`` defines (``DEFINE_config_file`` with ``lock_config=True``; the definition is
:func:`define_config_flag`), so a cell parses here to the same config the training command sees. Tasks keep their overrides as a dict of typed
values (JSON, for the results table); :func:`override_args` turns them into flag strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections

ROOT = Path(__file__).resolve().parents[2]  # the repository root (configs/, experiments/)
DEFAULT_CONFIG = "configs/btlm.py:tiny"


class SweepError(ValueError):
    """A bad grid, override, config or task file; the message names the culprit."""


def resolve_config(spec: str) -> str:
    """``FILE[:ARG]`` with FILE made absolute (relative paths are taken from the repository
    root when they do not exist from the working directory)."""
    path, colon, arg = spec.partition(":")
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = p.absolute() if p.exists() else ROOT / p
    if not p.exists():
        raise SweepError(f"--config={spec}: config file {p} does not exist")
    return f"{p}{colon}{arg}"


def flag_value(value: Any) -> str:
    """A typed override value as the text the config flag parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return "None" if value is None else str(value)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """``{"optim.peak_lr": 0.003}`` -> ``["--config.optim.peak_lr=0.003"]``."""
    return [f"--config.{k}={flag_value(v)}" for k, v in overrides.items()]


def split_override_args(args: Sequence[str]) -> dict[str, str]:
    """``["--config.train.steps=5"]`` -> ``{"train.steps": "5"}`` (untyped; see load_config)."""
    out = {}
    for a in args:
        if not a.startswith("--config.") or "=" not in a:
            raise SweepError(f"unrecognized argument {a!r} (a config override is "
                             "--config.KEY=VALUE)")
        key, _, value = a[len("--config."):].partition("=")
        out[key] = value
    return out


def define_config_flag(flag_values=None, sys_argv: Sequence[str] | None = None):
    """The ``--config`` flag (``ml_collections`` config file, locked) on ``flag_values`` (absl's
    global FLAGS by default): the definition ``btlm_jax.main`` uses, so both parse alike."""
    from absl import flags
    from ml_collections import config_flags

    return config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Config file (and preset), e.g. configs/btlm.py:3b_8k.",
        flag_values=flags.FLAGS if flag_values is None else flag_values, lock_config=True,
        sys_argv=None if sys_argv is None else list(sys_argv))


def load_config(config: str = DEFAULT_CONFIG,
                overrides: Mapping[str, Any] | Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of ``--config=CONFIG`` plus overrides (a dict of typed values or
    ``--config.KEY=VALUE`` strings), parsed by main's config flag. A bad key or value raises
    SweepError naming it."""
    from absl import flags

    args = list(overrides) if not isinstance(overrides, Mapping) else override_args(overrides)
    argv = ["btlm_jax.main", f"--config={resolve_config(config)}", *args]
    fv = flags.FlagValues()
    define_config_flag(fv, sys_argv=argv)
    try:
        fv(argv)
    except Exception as e:  # noqa: BLE001 - absl/ml_collections raise many types; name the culprit
        raise SweepError(_one_line(e, args)) from None
    return fv.config


def _one_line(e: Exception, args: Sequence[str]) -> str:
    text = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
    if text[:1] in "'\"" and text[-1:] == text[:1]:  # a repr'd KeyError message
        text = text[1:-1].strip()
    culprit = next((a.split("=", 1)[0] for a in args
                    if a.split("=", 1)[0].split(".")[-1] in text), None)
    if culprit is None:  # an unknown key: name the override whose path is not in the config
        culprit = next((a.split("=", 1)[0] for a in args if _missing(a, text)), "--config")
    return f"{culprit}: {text}"


def _missing(arg: str, text: str) -> bool:
    key = arg.split("=", 1)[0][len("--config."):]
    return any(f"'{part}'" in text for part in key.split("."))


def get_value(cfg: ml_collections.ConfigDict, key: str) -> Any:
    """``cfg`` at a dotted key; SweepError naming the key when it is not in the config."""
    node = cfg
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise SweepError(f"{'.'.join(key.split('.')[:i + 1])} is not a config key")
        node = node[part]
    return node
