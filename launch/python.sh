# Sourced by the launchers: sets PY to the Python that runs btlm_jax, checked to import it.
#   $PYTHON if set, else the repository's .venv/bin/python (what the README's quick start
#   creates), else python3 on PATH. A Python that cannot import btlm_jax is an error (exit 2).
btlm_python() {
  local repo=$1
  if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
  elif [ -x "$repo/.venv/bin/python" ]; then
    PY=$repo/.venv/bin/python
  else
    PY=python3
  fi
  if ! "$PY" -c 'import btlm_jax.cli.train' 2>/dev/null; then
    echo "error: $PY cannot import btlm_jax; install it there (pip install -e $repo) or set" \
      "PYTHON=/path/to/the/environment's/python" >&2
    exit 2
  fi
}
