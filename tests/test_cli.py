"""The commands as a newcomer meets them (issue 30): every console script's --help, presets from
any directory, every user error as one `error:` line (exit 2), and the ending of a preempted run.

Each command runs as installed: the console-script function named in setup.cfg, in a fresh
process (``sys.argv[0]`` is the script's name), from a directory outside the repository unless
the case needs the repository's files.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from btlm_jax import errors

ROOT = Path(__file__).resolve().parents[1]


def console_scripts() -> dict[str, str]:
    """``{"btlm-train": "btlm_jax.cli.train:run", ...}`` from setup.cfg."""
    cp = configparser.ConfigParser()
    cp.read(ROOT / "setup.cfg")
    lines = cp["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(x.strip() for x in ln.split("=", 1)) for ln in lines if ln.strip())


SCRIPTS = console_scripts()


def script(name: str, *args: str, cwd=None, env=None, timeout=300):
    """Runs console script ``name`` as pip's wrapper would: its function, argv[0] = its name."""
    mod, fn = SCRIPTS[name].split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {mod} import {fn}; sys.exit({fn}())"
    e = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    e.pop(errors.VERBOSE_ENV, None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd or ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# --help

# each command's own flags that its help must list
OWN_FLAGS = {
    "btlm-train": ["--config", "--workdir", "--verbose"],
    "btlm-evaluate": ["--workdir", "--lengths", "--position_interpolation", "--quantize", "--json"],
    "btlm-generate": ["--workdir", "--prompt", "--max_new_tokens", "--temperature", "--quantize"],
    "btlm-describe": ["--config", "--json", "--mesh", "--fake_devices"],
    "btlm-convert": ["--hf_dir", "--workdir", "--out", "--layout", "--dtype", "--overwrite"],
    "btlm-harness": ["--model", "--tasks", "--include_path", "--output_path", "--json"],
    "btlm-dedup": ["--input", "--output", "--mode", "--engine"],
    "btlm-sweep": ["grid", "task", "--config"],
    "btlm-batches": ["--workdir", "--steps", "--out", "--decode", "--rollbacks"],
}
# commands that take no config (btlm-dedup has its own options, no ml-collections config)
NO_CONFIG = {"btlm-dedup"}


def test_every_console_script_is_covered():
    assert set(SCRIPTS) == set(OWN_FLAGS)


def _check_help(name, r):
    assert r.returncode == 0, (name, r.returncode, r.stderr[-2000:])
    out = r.stdout
    for flag in OWN_FLAGS[name]:
        assert re.search(rf"(^|\s){re.escape(flag)}\b", out), (name, flag, out)
    assert "Traceback" not in r.stderr
    # absl's and JAX's own flags stay behind --helpfull
    assert "jax_" not in out and "logtostderr" not in out, (name, out[:3000])
    assert len(out.splitlines()) < 80, (name, len(out.splitlines()))
    if name not in NO_CONFIG:  # the override syntax with at least two examples
        assert "--config.KEY=VALUE" in out, (name, out)
        examples = re.findall(r"--config\.[a-z_]+\.[a-z_]+=\S+", out)
        assert len(set(examples)) >= 2, (name, examples)


def test_every_console_script_help_lists_its_flags_and_the_override_syntax(tmp_path):
    names = sorted(SCRIPTS)
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda n: script(n, "--help", cwd=tmp_path), names))
    for name, r in zip(names, runs):
        _check_help(name, r)
    # absl's full list is one flag away, and exits 0 too
    r = script("btlm-train", "--helpfull", cwd=tmp_path)
    assert r.returncode == 0 and "--workdir" in r.stdout and "logtostderr" in r.stdout


# ----------------------------------------------------------------------------------------------
# user errors: one line naming the culprit, exit 2

RUN = "/nonexistent/run"
# (script, args, words the error line must contain); run from a directory outside the repository.
# Mistakes in the flags: reported before JAX is imported (a fraction of a second each).
FLAG_ERRORS = [
    ("btlm-train", ["--config=configs/btlm.py:tiny_typo", "--workdir=W"],
     ["--config=configs/btlm.py:tiny_typo", "unknown preset 'tiny_typo'", "3b_8k"]),
    ("btlm-train", ["--config=tiny_typo", "--workdir=W"], ["unknown preset 'tiny_typo'"]),
    ("btlm-train", ["--config=nope.py", "--workdir=W"], ["--config=nope.py", "does not exist"]),
    ("btlm-train", ["--config=tiny"], ["--workdir is required"]),
    ("btlm-train", ["--config=tiny", "--wokdir=W"], ["unknown flag --wokdir", "--workdir"]),
    ("btlm-train", ["--workdir=W", "--config.train.stepz=5"],
     ["--config.train.stepz", "did you mean 'steps'"]),
    ("btlm-train", ["--workdir=W", "--config.train.steps=many"], ["--config.train.steps=many"]),
    ("btlm-train", ["--workdir=W", "stray"], ["unexpected arguments: stray"]),
    ("btlm-evaluate", [f"--workdir={RUN}", "--position_interpolation=sometimes"],
     ["--position_interpolation=sometimes"]),
    ("btlm-generate", [f"--workdir={RUN}", "--max_new_tokens=x"], ["--max_new_tokens=x"]),
    ("btlm-describe", ["--config=3b_8kk"], ["unknown preset '3b_8kk'"]),
    ("btlm-harness", ["--model=M"], ["--tasks is required"]),
    ("btlm-sweep", ["grid"], ["--out"]),
    ("btlm-sweep", ["grid", "--out=S", "--config=tiny_typo"], ["unknown preset 'tiny_typo'"]),
    ("btlm-sweep", ["grid", "--out=S", "--grid", "optim.peak_lrx=1e-3"], ["optim.peak_lrx"]),
    ("btlm-dedup", ["--output=O"], ["--input"]),
    ("btlm-batches", [f"--workdir={RUN}"], ["--steps is required"]),
]
# Mistakes found once the command runs (each imports JAX: a few seconds).
RUN_ERRORS = [
    ("btlm-train", ["--workdir=W", "--config.optim.warmup_steps=500"],
     ["optim.warmup_steps=500", "200 steps"]),
    ("btlm-evaluate", [f"--workdir={RUN}"], [f"{RUN}/config.json"]),
    ("btlm-generate", [f"--workdir={RUN}"], ["--prompt"]),
    ("btlm-generate", [f"--workdir={RUN}", "--prompt=a", "--temperature=-1"], ["temperature=-1"]),
    ("btlm-generate", [f"--workdir={RUN}", "--prompt=a"], [RUN]),
    ("btlm-describe", ["--config=tiny", "--config.model.n_heads=5"],
     ["model.d_model=256", "model.n_heads=5"]),
    ("btlm-describe", ["--config=tiny", "--mesh=1,1,1", "--config.model.attention=cudnn"],
     ["model.attention=cudnn", "NVIDIA GPU", "backend here is cpu"]),
    ("btlm-convert", [], ["import or export"]),
    ("btlm-convert", ["import", f"--workdir={RUN}"], ["--hf_dir"]),
    ("btlm-convert", ["export", f"--workdir={RUN}", "--out=O"], [RUN]),
    ("btlm-harness", [f"--model={RUN}", "--tasks=x"], [RUN]),
    ("btlm-batches", [f"--workdir={RUN}", "--steps=1:2", "--out=b.npz"], [f"{RUN}/config.json"]),
    # a cell that fails the run's own start checks: named before any run is launched
    ("btlm-sweep", ["grid", "--out=S", "--grid", "optim.schedule=d2z,wsd",
                    "--config.train.steps=20", "--config.optim.warmup_steps=5",
                    "--config.optim.cooldown_fraction=0.9"],
     ["run schedule=wsd", "cooldown_fraction=0.9", "warmup"]),
]


def _one_error(case, r):
    name, args, needles = case
    assert r.returncode == errors.EXIT_USER_ERROR, (name, args, r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, (name, args, r.stderr[-3000:])
    assert lines and lines[-1].startswith("error: "), (name, args, r.stderr[-2000:])
    assert len(lines) <= 2, (name, args, lines)  # generate may warn first; nothing else
    for n in needles:
        assert n in lines[-1], (name, args, n, lines[-1])


def _walk(cases, cwd):
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda c: script(c[0], *c[1], cwd=cwd), cases))
    for case, r in zip(cases, runs):
        _one_error(case, r)


def test_flag_mistakes_in_every_command_are_one_line(tmp_path):
    _walk(FLAG_ERRORS, tmp_path)
    # --verbose adds the traceback
    r = script("btlm-train", "--config=tiny_typo", "--workdir=W", "--verbose", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr and "error: " in r.stderr
    r = script("btlm-sweep", "grid", "--out=S", "--config=tiny_typo", "--verbose", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr


@pytest.mark.slow
def test_run_time_mistakes_in_every_command_are_one_line(tmp_path):
    assert {c[0] for c in FLAG_ERRORS + RUN_ERRORS} == set(SCRIPTS)  # every command walked
    _walk(RUN_ERRORS, tmp_path)
    assert not (tmp_path / "S").exists()  # the sweep refused before writing anything


# ----------------------------------------------------------------------------------------------
# presets from any directory


def test_describe_a_bare_preset_from_outside_the_repository(tmp_path):
    r = script("btlm-describe", "--config=3b_8k", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["num_params"] == 2_646_255_744  # BTLM-3B-8K as published (README)
    assert not [ln for ln in r.stderr.splitlines() if re.match(r"[IW]\d{4} ", ln)], r.stderr


@pytest.mark.slow
def test_describe_mesh_names_the_attention_auto_resolves_to(tmp_path):
    # tiny at 2048 tokens on one CPU device: auto is xla there (AUTO_TABLE has GPU rows only), a
    # dense [T, T] score matrix, so describe advises the blockwise kernels
    small = ["--config.model.d_model=64", "--config.model.n_layers=1", "--config.model.d_ff=128",
             "--config.model.n_heads=2", "--config.model.vocab_size=512"]
    r = script("btlm-describe", "--config=tiny", "--mesh=1,1,1", "--seq_len=2048",
               "--batch_size=1", *small, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "attention: model.attention=auto (here: xla) materialises [T, T] scores at seq " \
        "2048" in r.stdout, r.stdout[-1500:]
    r = script("btlm-describe", "--config=tiny", "--mesh=1,1,1", "--seq_len=256",
               "--batch_size=1", "--config.model.attention=flash", *small, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("attention: model.attention=flash")


@pytest.mark.slow
def test_train_a_bare_preset_from_outside_the_repository(tmp_path):
    over = {"train.steps": 2, "optim.warmup_steps": 1, "model.vocab_size": 512,
            "model.d_model": 32, "model.n_layers": 1, "model.d_ff": 64,
            "model.mup.base_d_model": 32, "model.mup.base_d_ff": 64.0, "train.seq_len": 32,
            "train.batch_size": 2, "eval.every_steps": 2, "eval.num_batches": 1,
            "eval.batch_size": 2, "checkpoint.every_steps": 2, "data.cache_dir": tmp_path / "c",
            "logging.progress_bar": False, "logging.measure_peak": False}
    away = tmp_path / "elsewhere"
    away.mkdir()
    r = script("btlm-train", "--config=tiny", "--workdir=W",
               *[f"--config.{k}={v}" for k, v in over.items()], cwd=away)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("done: step=2")
    assert json.loads((away / "W" / "config.json").read_text())["model"]["d_model"] == 32
    assert (away / "W" / "checkpoints" / "2").is_dir()


# ----------------------------------------------------------------------------------------------
# the ending line


def test_preempted_ending_names_step_checkpoint_and_resume_command():
    from btlm_jax.cli.train import ending

    argv = ["/x/btlm_jax/main.py", "--config=tiny", "--workdir=runs/my run"]
    line, status = ending({"preempted": True, "step": 22, "loss": 7.0}, "runs/my run", 200, argv)
    assert status == 75
    assert line == ("preempted at step 22 of 200: saved checkpoint runs/my run/checkpoints/22; "
                    "resume with: python -m btlm_jax.main --config=tiny "
                    "'--workdir=runs/my run'")
    line, status = ending({"preempted": True, "step": 3}, "W", 9, ["btlm-train", "--workdir=W"])
    assert line.endswith("resume with: btlm-train --workdir=W")
    line, status = ending({"step": 200, "loss": 5.25, "complete": True}, "W", 200, argv)
    assert (line, status) == ("done: step=200, loss=5.25", 0)
