"""What every absl command does the same way: ``--help``, flag errors as one ``error:`` line, quiet
library logs, start-up, and running ``main`` under the one-line error handler."""

from __future__ import annotations

import functools
import os
import re
import sys
import textwrap

from absl import app, flags, logging

from btlm_jax import errors

HELP_ARGS = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")
FULL_HELP_ARGS = ("--helpfull", "-helpfull")

# the --config.KEY=VALUE syntax, shown in every command's --help
OVERRIDES_HELP = """\
Config overrides: --config.KEY=VALUE sets any key of btlm_jax/config.py on top of the preset or
config file (a misspelt key fails naming it), e.g.
  --config.train.steps=500
  --config.optim.peak_lr=3e-3 --config.optim.schedule=d2z"""
RUN_CONFIG_HELP = """\
Config: the run's own RUN/config.json; its keys are set when training with --config.KEY=VALUE
overrides, e.g.
  btlm-train --config=tiny --workdir=RUN --config.train.steps=500
  btlm-train --config=tiny --workdir=RUN --config.optim.peak_lr=3e-3"""


def start(argv, *, distributed: bool = True) -> None:
    """The start of a command's ``main``: no stray arguments, and multi-host start-up when the
    environment asks for it."""
    if len(argv) > 1:
        raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])} (flags are "
                               "--name=value; see --help)")
    if distributed:
        from btlm_jax.parallel.distributed import maybe_initialize

        maybe_initialize()


def _module_flags(module_name: str) -> list:
    """The flags a module defined (absl files the flags of ``__main__`` under sys.argv[0])."""
    by_module = flags.FLAGS.flags_by_module_dict()
    names = [module_name] + ([sys.argv[0]] if module_name == "__main__" else [])
    return [f for n in names for f in by_module.get(n, [])]


def _flag_line(f) -> str:
    """``  --name=TYPE`` and the flag's help with its default, wrapped at 100 columns."""
    kind = f.flag_type() or ""
    enum = getattr(f.parser, "enum_values", None)
    if f.boolean:
        value = ""
    elif enum:
        value = "=" + "|".join(enum)
    else:
        value = "=" + {"int": "INT", "float": "FLOAT", "config": "CONFIG"}.get(
            kind.split()[0], "VALUE")
    if f.name == "config":
        default = " (default: tiny)"
    elif f.default in (None, "", [], False) or f.boolean and not f.default:
        default = ""
    else:
        shown = f.default_as_str.strip("'") if f.default_as_str else f.default
        default = f" (default: {shown})"
    text = re.sub(r"^<[^>]*>: ", "", f.help)  # absl's additions to enum and multi flags
    text = re.sub(r";\s*repeat this option to specify a list of values$", "", text)
    body = textwrap.fill(f"{text}{default}", 100, initial_indent=" " * 6,
                         subsequent_indent=" " * 6)
    return f"  --{f.name}{value}\n{body}"


def help_text(prog: str, module, config: bool) -> str:
    """``prog``'s help: the module's docstring, its own flags, the override syntax."""
    doc = (module.__doc__ or "").strip()
    own = _module_flags(module.__name__)
    first = [flags.FLAGS["config"]] if config and "config" in flags.FLAGS else []
    last = [flags.FLAGS["verbose"]] if "verbose" in flags.FLAGS else []
    seen, lines = set(), []
    for f in first + own + last:
        if f.name not in seen:
            seen.add(f.name)
            lines.append(_flag_line(f))
    parts = [f"{prog}: {doc}" if doc else prog, "flags:\n" + "\n".join(lines),
             OVERRIDES_HELP if config else RUN_CONFIG_HELP,
             textwrap.fill("--helpfull lists every flag (absl's and JAX's too). A user error "
                           "prints one 'error: ...' line and exits 2 (--verbose adds the "
                           "traceback).", 100)]
    return "\n\n".join(parts)


def _flag_error(e: Exception) -> str:
    text = " ".join(str(e).split())
    if text.startswith("flag --"):
        text = text[len("flag "):]
    m = re.fullmatch(r"Unknown command line flag '([^']+)'(?:\. Did you mean: (.+?) \?)?", text)
    if m:
        text = f"unknown flag --{m.group(1)}"
        if m.group(2):
            text += "; did you mean " + " or ".join(
                f"--{x.strip()}" for x in m.group(2).split(","))
            text += "?"
    return f"{text} (see --help)"


def parse_flags(argv, *, prog: str, module, config: bool, required=()):
    """absl's flag parsing with ``--help`` (exit 0), ``--helpfull`` and errors as one line."""
    args = argv[1:]
    if any(a in HELP_ARGS for a in args):
        print(help_text(prog, module, config))
        sys.exit(0)
    if any(a in FULL_HELP_ARGS for a in args):
        print(flags.FLAGS.get_help())
        sys.exit(0)
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        raise errors.UserError(_flag_error(e)) from e
    for name in required:
        if flags.FLAGS[name].value in (None, ""):
            raise errors.UserError(f"--{name} is required (see {prog} --help)")
    if not any(a.startswith(("--verbosity", "-v=", "--v=")) for a in args):
        # library INFO logs (JAX backends, Orbax) would come before the results
        logging.set_verbosity(logging.WARNING)
    return rest


def run_app(main, *required: str, prog: str | None = None) -> None:
    """``app.run(main)`` with ``required`` flags, ``--help`` for the command (its module's
    docstring and flags) and user errors, including config overrides absl parses inside
    ``app.run``, as one ``error:`` line (exit 2)."""
    module = sys.modules[main.__module__]
    prog = prog or os.path.basename(sys.argv[0])
    config = getattr(module, "_CONFIG", None) is not None  # the command takes --config
    parser = functools.partial(parse_flags, prog=prog, module=module, config=config,
                               required=required)
    with errors.cli():
        app.run(main, flags_parser=parser)
