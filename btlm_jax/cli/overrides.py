"""Config overrides and ``--config`` itself, parsed exactly as ``btlm-train`` parses them.

``--config`` is a preset name (``tiny``, ``3b_8k``: :mod:`btlm_jax.presets`, from any directory)
or a config file ``FILE.py[:ARG]`` (:func:`resolve_config`). A sweep cell is ``--config=...``
plus ``--config.KEY=VALUE`` strings. They are parsed by an ``absl`` ``FlagValues`` holding the
same ``ml_collections`` config-file flag that ``btlm_jax.main`` defines (:func:`define_config_flag`:
``DEFINE_config_file``'s flag, locked, with the resolving parser), so a cell parses here to the
same config the training command sees. Tasks keep their overrides as a dict of typed values
(JSON, for the results table); :func:`override_args` turns them into flag strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections

ROOT = Path(__file__).resolve().parents[2]  # the repository root (configs/, experiments/)
PRESETS_FILE = Path(__file__).resolve().parents[1] / "presets.py"  # ships with the package
REPO_PRESETS = Path("configs") / "btlm.py"  # the repository's shim of PRESETS_FILE
DEFAULT_CONFIG = "tiny"


class SweepError(ValueError):
    """A bad grid, override, config or task file; the message names the culprit."""


def _preset_names() -> str:
    from btlm_jax.presets import PRESETS

    return ", ".join(PRESETS)


def resolve_config(spec: str) -> str:
    """``--config``'s value as an absolute ``FILE[:ARG]``.

    A bare name (``tiny``, ``3b_8k``: no ``/``, no ``.py``) is a preset of the package
    (:mod:`btlm_jax.presets`), so it works from any directory. A relative FILE is taken from the
    working directory, else from the repository root; ``configs/btlm.py`` without a repository
    is the package's presets. A missing file raises SweepError naming it."""
    try:
        return _resolve(spec)
    except ValueError as e:
        raise SweepError(f"--config={spec}: {e}") from None


def _resolve(spec: str) -> str:
    path, colon, arg = spec.strip().partition(":")
    if not path:
        raise ValueError(f"give a preset ({_preset_names()}) or a config file FILE.py[:ARG]")
    p = Path(path).expanduser()
    if not colon and "/" not in path and p.suffix != ".py" and not p.exists():
        return f"{PRESETS_FILE}:{path}"  # a bare preset name (an unknown one is named later)
    if not p.is_absolute():
        if p.exists():
            p = p.absolute()
        elif (ROOT / p).exists():
            p = ROOT / p
        elif p == REPO_PRESETS:
            p = PRESETS_FILE
    if not p.is_file():
        where = f" (looked in {Path.cwd()} and {ROOT})" if not p.is_absolute() else ""
        raise ValueError(f"config file {path} does not exist{where}; give a preset "
                         f"({_preset_names()}) or a config file FILE.py[:ARG]")
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


def _one_line_text(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _config_file_parser():
    """ml_collections' config-file parser with :func:`resolve_config` in front (bare preset
    names, repository-relative files) and errors of the config file as one line."""
    from ml_collections.config_flags import config_flags as cf

    class ConfigFileParser(cf.ConfigFileFlagParser):
        def parse(self, path):
            try:
                config = super().parse(_resolve(path))
            except (TypeError, ValueError) as e:
                # the library re-raises with the traceback as text; keep the original message
                raise ValueError(_one_line_text(e.__context__ or e)) from None
            try:  # a file that could not be loaded surfaces at first use; say it now
                getattr(config, "keys", None)
            except OSError as e:
                raise ValueError(_one_line_text(e)) from None
            return config

    return ConfigFileParser(name="config", lock_config=True)


def define_config_flag(flag_values=None, sys_argv: Sequence[str] | None = None):
    """The ``--config`` flag (``ml_collections`` config file, locked) on ``flag_values`` (absl's
    global FLAGS by default): the definition every command and sweep cell uses, so all parse
    alike. Its value is a preset name (``tiny``) or ``FILE.py[:ARG]`` (:func:`resolve_config`).
    """
    from absl import flags
    from ml_collections.config_flags import config_flags as cf

    fv = flags.FLAGS if flag_values is None else flag_values
    flag = cf._ConfigFlag(  # DEFINE_config_file's flag, with the resolving parser
        parser=_config_file_parser(), serializer=flags.ArgumentSerializer(), name="config",
        default=DEFAULT_CONFIG,
        help_string=f"A preset ({_preset_names()}) or a config file FILE.py[:ARG], e.g. "
        "configs/btlm.py:3b_8k in the repository.",
        flag_values=fv, accept_new_attributes=False,
        sys_argv=None if sys_argv is None else list(sys_argv))
    return flags.DEFINE_flag(flag, fv)


def load_config(config: str = DEFAULT_CONFIG,
                overrides: Mapping[str, Any] | Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of ``--config=CONFIG`` plus overrides (a dict of typed values or
    ``--config.KEY=VALUE`` strings), parsed by main's config flag. A bad key or value raises
    SweepError naming it."""
    from absl import flags

    args = list(overrides) if not isinstance(overrides, Mapping) else override_args(overrides)
    resolve_config(config)  # a missing file: SweepError naming it
    argv = ["btlm_jax.main", f"--config={config}", *args]
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
    if text.startswith("flag --"):  # absl names the flag and its value itself
        return text[len("flag "):]
    culprit = next((a.split("=", 1)[0] for a in args
                    if a.split("=", 1)[0].split(".")[-1] in text), None)
    if culprit is None:  # an unknown key: name the override whose path is not in the config
        culprit = next((a.split("=", 1)[0] for a in args if _missing(a, text)), "--config")
    return f"{culprit}: {text}"


def _missing(arg: str, text: str) -> bool:
    key = arg.split("=", 1)[0][len("--config."):]
    return any(f"'{part}'" in text for part in key.split("."))


def check_cell(name: str, cfg: ml_collections.ConfigDict) -> None:
    """What a run checks at start, before any run of a sweep is launched: the config's
    validation and the optimizer and schedule it builds. SweepError naming the run and key."""
    from btlm_jax import optim
    from btlm_jax.config import parse_phases, validate

    try:
        validate(cfg)
        optim.build(cfg, sum(p[2] for p in parse_phases(cfg)))
    except ValueError as e:
        raise SweepError(f"run {name}: {_one_line_text(e)}") from None


def get_value(cfg: ml_collections.ConfigDict, key: str) -> Any:
    """``cfg`` at a dotted key; SweepError naming the key when it is not in the config."""
    node = cfg
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise SweepError(f"{'.'.join(key.split('.')[:i + 1])} is not a config key")
        node = node[part]
    return node
