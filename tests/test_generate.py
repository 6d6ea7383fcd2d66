"""Generation: KV-cached decoding gives the logits of a full forward pass (left-padded batches,
ALiBi and learned positions, scanned and unrolled layers, position interpolation); greedy
generation equals argmax over repeated full forwards; top-k / top-p against NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from btlm_jax.config import default_config
from btlm_jax.eval.sampling import Generator, SamplingConfig, filter_logits, left_pad
from btlm_jax.models.btlm import BTLM, init_cache


def tiny(position="alibi", scan=True):
    m = default_config().model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 61, 32, 2, 4, 48
    m.mup.base_d_model, m.mup.base_d_ff = 16, 24.0
    m.position, m.scan_layers, m.max_seq_len = position, scan, 64
    model = BTLM(m)
    params = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32)))["params"])(
        jax.random.PRNGKey(0))
    return model, params


_FWD = {}


def full_logits(model, params, seq, scale=1.0, pad_to=16):
    """Full (uncached) forward; right padding does not change causal logits of real tokens."""
    if id(model) not in _FWD:
        _FWD[id(model)] = (model, jax.jit(lambda p, t, s: model.apply({"params": p}, t, alibi_scale=s)))
    fwd = _FWD[id(model)][1]
    x = np.zeros((1, pad_to), np.int32)
    x[0, :len(seq)] = seq
    return np.asarray(fwd(params, x, scale))[0, :len(seq)]


@pytest.mark.parametrize("position,scan,scale", [
    ("alibi", True, 1.0), ("alibi", False, 2.5), ("learned", True, 1.0)])
def test_cached_decode_equals_full_forward(position, scan, scale):
    model, params = tiny(position, scan)
    rs = np.random.RandomState(0)
    seqs = [rs.randint(0, 61, n).tolist() for n in (11, 7, 9)]
    prompt_lens = [5, 2, 9]
    toks, seg, pos = left_pad([s[:p] for s, p in zip(seqs, prompt_lens)])
    p_len = toks.shape[1]
    steps = 4
    cache = init_cache(model.cfg, 3, p_len + steps)
    decode = jax.jit(lambda p, c, t, i, s, q: model.apply(
        {"params": p}, t, c, i, s, q, scale, method=BTLM.decode))
    logits, cache = decode(params, cache, toks, 0, seg, pos)
    got = [[np.asarray(logits[b, p_len - 1])] for b in range(3)]
    for t in range(steps):
        nxt = np.array([[s[p + t] if p + t < len(s) else 0] for s, p in zip(seqs, prompt_lens)])
        q = np.array([[p + t] for p in prompt_lens])
        logits, cache = decode(params, cache, nxt, p_len + t, np.ones_like(nxt), q)
        for b in range(3):
            got[b].append(np.asarray(logits[b, 0]))
    for b, (s, p) in enumerate(zip(seqs, prompt_lens)):
        n = min(len(s), p + steps)
        full = full_logits(model, params, s[:n], scale)
        for t in range(n - p + 1):
            if p - 1 + t < n:
                np.testing.assert_allclose(got[b][t], full[p - 1 + t], rtol=1e-4, atol=1e-4)


def test_greedy_generation_equals_argmax_of_full_forward():
    model, params = tiny()
    prompts = [[3, 14, 15, 9, 26], [5, 35]]
    gen = Generator(model, params)
    outs = gen.generate(prompts, SamplingConfig(max_new_tokens=6, temperature=0.0))
    for p, o in zip(prompts, outs):
        seq = list(p)
        for _ in range(6):
            logits = full_logits(model, params, seq)[-1]
            seq.append(int(np.argmax(logits)))
        assert o == seq[len(p):]


def test_sampling_is_seeded_and_respects_eos():
    model, params = tiny()
    gen = Generator(model, params)
    sc = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    a = gen.generate([[1, 2, 3], [4]], sc)
    b = gen.generate([[1, 2, 3], [4]], sc)
    assert a == b and all(len(x) == 8 for x in a)
    greedy = gen.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=8, temperature=0.0))[0]
    cut = gen.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=8, temperature=0.0),
                       eos_id=greedy[2])[0]
    assert cut == greedy[: greedy.index(greedy[2])]
    with pytest.raises(ValueError, match="top_p"):
        gen.generate([[1]], SamplingConfig(top_p=0.0))


def _np_filter(x, k, p):
    keep = np.ones_like(x, bool)
    order = np.argsort(-x, kind="stable")
    if k:
        keep &= x >= x[order[k - 1]]
    if p < 1:
        z = np.where(keep, x, -np.inf)
        pr = np.exp(z - z.max())
        pr /= pr.sum()
        srt = np.sort(pr)[::-1]
        cum = np.cumsum(srt)
        n = int(np.searchsorted(cum, p) + 1)  # smallest prefix whose mass reaches p
        n = min(n, int(keep.sum()))
        keep &= pr >= srt[n - 1]
    return keep


@pytest.mark.parametrize("k,p", [(5, 1.0), (0, 0.5), (7, 0.8), (1, 0.3), (0, 0.999)])
def test_top_k_top_p_match_numpy(k, p):
    rs = np.random.RandomState(k * 10 + int(p * 10))
    x = (rs.randn(4, 50) * 2).astype(np.float32)
    got = np.asarray(filter_logits(jnp.asarray(x), k, p)) > np.finfo(np.float32).min
    for row in range(4):
        np.testing.assert_array_equal(got[row], _np_filter(x[row].astype(np.float64), k, p))
