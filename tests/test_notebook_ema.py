"""notebooks/ema_timescales.ipynb executes and writes its figures (as PNG)."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "ema_timescales.ipynb"
FIGURES = ("ema_lr_schedules.png", "ema_coefficients.png", "ema_init_weight.png",
           "ema_peak_lr_wd.png")


@pytest.mark.slow
def test_ema_notebook_executes_and_saves_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("BTLM_FIGURES_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on any failing cell (including its asserts)
    for name in FIGURES:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    assert "tau_iter/T at the peak: 0.312" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()
            if line.split() and line.split()[0] in ("d2z", "constant")}
    # D2Z keeps far less weight on the last 10% of updates than a constant LR does
    assert float(rows["d2z"][1]) < 0.1 < float(rows["constant"][1])
