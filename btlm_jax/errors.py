"""User errors at the command line: one ``error: ...`` line, exit status 2.

Every entry point (``main``, ``evaluate``, ``generate``, ``convert``, ``describe``, ``harness``,
``dedup``, the sweeps) runs under :func:`cli` (or the :func:`entry_point` decorator); absl's flag
errors (an unknown flag, a bad value, a misspelt preset) become user errors in
:func:`btlm_jax.cli.common.parse_flags`. An error the user can cause and fix (a
config mistake, missing data or tokenizer, an impossible mesh, a corrupt or foreign checkpoint, a
busy workdir, a diverged run, a full disk, a read-only or misplaced directory) prints one line
naming the culprit and what to do, and exits 2. Anything else is a bug and keeps its traceback.
``--verbose`` (or ``BTLM_VERBOSE=1``) prints the traceback of user errors too.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import sys
import traceback

VERBOSE_ENV = "BTLM_VERBOSE"
EXIT_USER_ERROR = 2
# a run stopped by SIGTERM / Ctrl-C after saving a checkpoint: sysexits.h EX_TEMPFAIL ("a
# temporary failure; try again later"), the status a launcher requeues on (SLURM: RequeueExit=75
# in slurm.conf, or launch/slurm_gpu.sbatch's own requeue); 0 would read as "finished"
EXIT_PREEMPTED = 75


class UserError(Exception):
    """An error whose message already says what happened and what to do."""


class DiskFullError(UserError, OSError):
    """ENOSPC while writing; the message names the device and the path."""

    def __init__(self, path, device: str | None = None):
        path = str(path)
        self.path, self.device = path, device or device_of(path)
        super().__init__(errno.ENOSPC,
                         f"no space left on {self.device} while writing {path}; free space and "
                         "rerun (the run resumes from its last checkpoint)")

    def __str__(self):
        return self.args[1]


def device_of(path) -> str:
    """The mount point (and its device) holding ``path``, from /proc/mounts where available."""
    p = os.path.abspath(str(path))
    while not os.path.exists(p) and p != os.path.dirname(p):
        p = os.path.dirname(p)
    dev, mnt = "", "/"
    try:
        with open("/proc/mounts") as f:
            for ln in f:
                parts = ln.split()
                if len(parts) < 2:
                    continue
                m = parts[1].replace("\\040", " ")
                if (p == m or p.startswith(m.rstrip("/") + "/")) and len(m) >= len(mnt):
                    dev, mnt = parts[0], m
    except OSError:
        return p
    return f"{mnt} ({dev})" if dev else mnt


def is_enospc(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "ENOSPC" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def enospc_path(e: BaseException) -> str | None:
    while e is not None:
        if isinstance(e, OSError) and getattr(e, "filename", None):
            return str(e.filename)
        e = e.__cause__ or e.__context__
    return None


class _DropDiskFullLogs(logging.Filter):
    """Drops library log records about a full disk (Orbax's background save threads log each
    failed write with its traceback): the run reports it once, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_enospc(exc):
            return False
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not ("No space left on device" in text or "os_error_code='28'" in text)


_DISK_FULL_FILTER = _DropDiskFullLogs()


def quiet_disk_full_logs() -> None:
    """Installs the filter on the root logger's handlers (absl's among them) and absl's logger,
    and drops the "Event loop is closed" errors that TensorStore callbacks of a failed Orbax save
    print one per pending write; idempotent."""
    targets = list(logging.getLogger().handlers) + [logging.getLogger("absl")]
    for t in targets:
        if _DISK_FULL_FILTER not in t.filters:
            t.addFilter(_DISK_FULL_FILTER)
    if not getattr(sys.excepthook, "_btlm_quiet", False):
        previous = sys.excepthook

        def hook(tp, value, tb, previous=previous):
            if tp is RuntimeError and str(value) == "Event loop is closed":
                return  # a callback of an aborted asynchronous write; the cause is reported
            previous(tp, value, tb)

        hook._btlm_quiet = True
        sys.excepthook = hook
    if not getattr(sys.unraisablehook, "_btlm_quiet", False):
        previous_u = sys.unraisablehook

        def unraisable(u, previous_u=previous_u):
            # TensorStore reports exceptions of its asyncio callbacks as unraisable
            if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == \
                    "Event loop is closed":
                return
            previous_u(u)

        unraisable._btlm_quiet = True
        sys.unraisablehook = unraisable


def _user_error_types() -> tuple:
    """The package's user-facing exception classes (imported lazily: they live in modules with
    heavy imports, and a missing optional module must not break error reporting)."""
    names = [
        ("btlm_jax.config", "ConfigError"), ("btlm_jax.train.run_dir", "RunError"),
        ("btlm_jax.train.checkpoint", "CheckpointMismatchError"),
        ("btlm_jax.train.checkpoint", "CheckpointCorruptError"),
        ("btlm_jax.data.tokenizer", "TokenizerError"), ("btlm_jax.data.slimpajama", "DataError"),
        ("btlm_jax.parallel.mesh", "ShardingError"), ("btlm_jax.convert.hf", "ConversionError"),
        ("btlm_jax.models.quant", "QuantizationError"), ("btlm_jax.api", "LoadError"),
        ("btlm_jax.data.dedup.io", "DedupInputError"), ("btlm_jax.harness.lm", "HarnessError"),
    ]
    out = [UserError]
    for mod, name in names:
        m = sys.modules.get(mod)  # only modules already imported can have raised
        if m is not None and hasattr(m, name):
            out.append(getattr(m, name))
    return tuple(out)


def _raised_in_package(e: BaseException) -> bool:
    """Whether the innermost frame that raised ``e`` is this package's code (a ValueError our
    code raises is a message for the user; one from inside a library is a bug to report)."""
    tb = e.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    here = os.path.dirname(os.path.abspath(__file__))
    return last is not None and os.path.abspath(last).startswith(here + os.sep)


_DID_YOU_MEAN = re.compile(r"'(\w+)'.*?Did you mean \"(\w+)\"", re.S)


def _config_override_message(e: BaseException) -> str | None:
    """A misspelt ``--config.a.b=...`` override (ml_collections raises KeyError/AttributeError
    while the flag is defined)."""
    if not isinstance(e, (KeyError, AttributeError)):
        return None
    tb = traceback.extract_tb(e.__traceback__)
    if not any("ml_collections" in f.filename for f in tb):
        return None
    text = str(e).encode().decode("unicode_escape") if "\\n" in str(e) else str(e)
    m = _DID_YOU_MEAN.search(text)
    key = m.group(1) if m else re.sub(r"[\"'\\]", "", text.split()[0] if text.split() else "")
    flag = next((a.split("=")[0] for a in sys.argv[1:]
                 if a.startswith("--config.") and key and re.search(rf"\b{re.escape(key)}\b", a)),
                None)
    msg = f"{flag or 'a --config override'}: {key!r} is not a config key"
    if m:
        msg += f"; did you mean {m.group(2)!r}?"
    return msg + " (the keys are in btlm_jax/config.py)"


def message(e: BaseException) -> str | None:
    """The one-line message for a user error, or None for a bug (keep the traceback)."""
    if is_enospc(e):
        if isinstance(e, DiskFullError):
            return str(e)
        return str(DiskFullError(enospc_path(e) or "?"))
    if isinstance(e, _user_error_types()):
        return _one_line(e)
    if isinstance(e, OSError):
        what = {errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
        name = e.filename if e.filename is not None else ""
        extra = f" and {e.filename2}" if getattr(e, "filename2", None) else ""
        reason = what.get(e.errno, e.strerror or type(e).__name__)
        hint = {errno.ENOENT: "check the path", errno.ENOTDIR: "a part of the path is a file",
                errno.EISDIR: "it is a directory, give a file",
                errno.EROFS: "choose a writable directory",
                errno.EACCES: "choose a directory you can write to",
                errno.EPERM: "choose a directory you can write to"}.get(e.errno, "check the path")
        return f"{name}{extra}: {reason}; {hint}" if name else f"{reason}: {e}; {hint}"
    msg = _config_override_message(e)
    if msg:
        return msg
    if isinstance(e, (ValueError, FloatingPointError)) and _raised_in_package(e):
        return _one_line(e)
    return None


def _one_line(e: BaseException) -> str:
    s = str(e).strip()
    if isinstance(e, KeyError) and s.startswith(("'", '"')):
        s = s[1:-1]
    return " ".join(s.split()) or type(e).__name__


def verbose() -> bool:
    if os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0", "false", "False"):
        return True
    try:
        from absl import flags

        if "verbose" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.verbose:
            return True
    except ImportError:
        pass
    return any(a in ("--verbose", "-verbose", "--verbose=true", "--verbose=True")
               for a in sys.argv[1:])


def define_verbose_flag() -> None:
    """An absl ``--verbose`` flag (idempotent) for the entry points that parse flags with absl."""
    from absl import flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, f"On a user error print the traceback too (or set "
                          f"{VERBOSE_ENV}=1).")


def report(e: BaseException, stream=None, verbose_: bool | None = None) -> bool:
    """Prints ``e`` as a user error (traceback first when verbose); False if it is a bug.
    ``verbose_`` overrides the --verbose / BTLM_VERBOSE lookup (a CLI with its own parser)."""
    msg = message(e)
    if msg is None:
        return False
    stream = stream or sys.stderr
    if verbose_ or (verbose_ is None and verbose()) or (verbose_ is False and os.environ.get(
            VERBOSE_ENV, "").strip() not in ("", "0", "false", "False")):
        traceback.print_exception(type(e), e, e.__traceback__, file=stream)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    print(f"error: {msg}", file=stream, flush=True)
    return True


@contextlib.contextmanager
def cli():
    """Turns user errors raised inside into one ``error:`` line and exit status 2."""
    quiet_disk_full_logs()
    try:
        yield
    except (SystemExit, KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - classified below; bugs re-raised
        if not report(e):
            raise
        if is_enospc(e):
            # no interpreter shutdown: callbacks of aborted asynchronous writes would print
            # tracebacks after the one line (the run has stopped; its files are closed)
            for f in (sys.stdout, sys.stderr):
                try:
                    f.flush()
                except (OSError, ValueError):
                    pass
            os._exit(EXIT_USER_ERROR)
        sys.exit(EXIT_USER_ERROR)


def entry_point(fn):
    """Decorator form of :func:`cli` for ``main(argv)`` functions."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with cli():
            return fn(*args, **kwargs)

    return wrapped
