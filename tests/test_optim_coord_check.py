"""muP coordinate check: block outputs flat in width under muP, growing under SP."""

import pytest

from btlm_jax.config import default_config
from btlm_jax.experiments import coord_check


def small_cfg():
    cfg = default_config()
    cfg.model.update(vocab_size=256, n_layers=1, n_heads=2, d_model=64, d_ff=171)
    cfg.model.mup.update(base_d_model=32, base_d_ff=85.5)
    cfg.optim.peak_lr = 6e-3
    return cfg


@pytest.mark.slow
def test_mup_flat_sp_grows():
    res = coord_check.coord_check(small_cfg(), [32, 128], steps=3, batch_size=2, seq_len=8)
    assert set(res) == {"mup", "sp"} and set(res["mup"]) == {32, 128}
    assert set(res["mup"][32][0]) == {"embed", "layers_0", "ln_f", "logits", "loss"}
    sl = coord_check.slopes(res)
    # Hidden activations after training steps: width independent under muP ...
    assert abs(sl["mup"]["layers_0"]) < 0.25, sl
    # ... and growing with width under the standard parametrisation (same LR, Adam).
    assert sl["sp"]["layers_0"] > 0.75, sl
    assert abs(sl["mup"]["embed"]) < 0.1 and abs(sl["sp"]["embed"]) < 0.1


def test_bad_widths_are_named():
    with pytest.raises(ValueError, match="--widths"):
        coord_check.coord_check(small_cfg(), [64])
    with pytest.raises(ValueError, match="width 33"):
        coord_check.coord_check(small_cfg(), [33, 64], steps=1)
