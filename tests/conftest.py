import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so tests can import configs/*.py presets
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Many tests (and the subprocesses they start, which inherit this environment) compile the same
# small programs: JAX's persistent compilation cache lets every compile after the first load the
# executable instead (the key covers the HLO, the compile options, the flags and the jax
# version, so a stale entry is never used). Set JAX_COMPILATION_CACHE_DIR to choose the folder.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(tempfile.gettempdir()) / f"btlm_jax_tests_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The suite's programs are small: XLA:CPU's compile time, not their run time, dominates, and
# LLVM's optimisation level 0 compiles them about a third faster (the HLO passes, buffer
# assignment and memory analysis are the same). Subprocesses get it through tests/helpers.py's
# xla_flags(); set XLA_FLAGS yourself to test at the default level.
if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
