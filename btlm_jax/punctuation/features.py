"""Acoustic features from a waveform: YIN pitch, RMS energy, silence, and per-word statistics.

Pitch uses YIN (de Cheveigne and Kawahara, 2002): the cumulative-mean-normalised difference
function, an absolute threshold, and parabolic interpolation of the chosen lag. It is written with
NumPy FFTs over all frames at once (librosa's ``pyin``/``yin`` would pull numba and a compile step
into a dependency that otherwise needs only NumPy/SciPy).
"""

from __future__ import annotations

import numpy as np
from scipy import signal

FEATURE_NAMES = ("duration", "pause_after", "pitch_level", "pitch_slope", "energy")
HOP_S = 0.010  # analysis hop, seconds


def frame_signal(x: np.ndarray, frame: int, hop: int) -> np.ndarray:
    """Frames of length ``frame`` starting every ``hop`` samples (zero-padded at the end);
    frame k starts at sample k * hop and there are ceil(len(x) / hop) frames."""
    n_frames = max(1, -(-len(x) // hop))
    padded = np.zeros(n_frames * hop + frame, dtype=np.float64)
    padded[: len(x)] = x
    return np.lib.stride_tricks.sliding_window_view(padded, frame)[::hop][:n_frames]


def yin(
    x: np.ndarray,
    sr: int,
    *,
    fmin: float = 60.0,
    fmax: float = 500.0,
    hop_s: float = HOP_S,
    threshold: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """YIN F0 track. Returns (f0 in Hz, aperiodicity) per hop; f0 is NaN where no lag's
    normalised difference falls below ``threshold`` (unvoiced)."""
    if not 0 < fmin < fmax < sr / 2:
        raise ValueError(f"need 0 < fmin < fmax < sr/2, got fmin={fmin}, fmax={fmax}, sr={sr}")
    hop = max(1, int(round(hop_s * sr)))
    tau_max = int(np.ceil(sr / fmin))
    tau_min = max(2, int(np.floor(sr / fmax)))
    w = tau_max  # integration window: one longest period
    # Centre frame k on sample k * hop.
    x = np.concatenate([np.zeros((w + tau_max + 1) // 2), np.asarray(x, np.float64)])
    frames = frame_signal(x, w + tau_max + 1, hop)[: max(1, -(-(len(x) - (w + tau_max + 1) // 2) // hop))]
    n_fft = 1 << int(np.ceil(np.log2(2 * (w + tau_max + 1))))
    spec_full = np.fft.rfft(frames, n_fft, axis=1)
    spec_head = np.fft.rfft(frames[:, :w], n_fft, axis=1)
    r = np.fft.irfft(np.conj(spec_head) * spec_full, n_fft, axis=1)[:, : tau_max + 1]
    sq = np.concatenate([np.zeros((len(frames), 1)), np.cumsum(frames**2, axis=1)], axis=1)
    taus = np.arange(tau_max + 1)
    energy_tau = sq[:, taus + w] - sq[:, taus]  # sum_{j=tau}^{tau+w-1} x_j^2
    d = np.maximum(energy_tau[:, :1] + energy_tau - 2.0 * r, 0.0)
    cum = np.cumsum(d[:, 1:], axis=1)
    cmnd = np.ones_like(d)
    cmnd[:, 1:] = d[:, 1:] * taus[1:] / np.maximum(cum, 1e-12)

    f0 = np.full(len(frames), np.nan)
    aper = np.ones(len(frames))
    below = cmnd[:, tau_min : tau_max + 1] < threshold
    rows = np.flatnonzero(below.any(axis=1))
    if len(rows):
        sub = cmnd[rows]
        t = np.argmax(below[rows], axis=1) + tau_min  # first lag under the threshold
        while True:  # then walk down to the bottom of that dip
            nxt = np.minimum(t + 1, tau_max)
            step = (t < tau_max) & (sub[np.arange(len(t)), nxt] < sub[np.arange(len(t)), t])
            if not step.any():
                break
            t = t + step
        idx = np.arange(len(t))
        inner = t < tau_max
        prev_v = sub[idx, t - 1]
        mid_v = sub[idx, t]
        next_v = sub[idx, np.minimum(t + 1, tau_max)]
        denom = prev_v - 2 * mid_v + next_v
        ok = inner & (denom > 0)
        shift = np.where(ok, 0.5 * (prev_v - next_v) / np.where(ok, denom, 1.0), 0.0)
        f0[rows] = sr / (t + np.clip(shift, -1.0, 1.0))
        aper[rows] = mid_v
    return f0, aper


def rms_db(x: np.ndarray, sr: int, *, hop_s: float = HOP_S) -> np.ndarray:
    """RMS energy in dB (re full scale) of consecutive non-overlapping windows of one hop, so
    window k covers samples [k*hop, (k+1)*hop) and never leaks into a neighbouring word."""
    hop = int(round(hop_s * sr))
    return 10.0 * np.log10(np.mean(frame_signal(x, hop, hop) ** 2, axis=1) + 1e-10)


def silence_mask(energy_db: np.ndarray, rel_db: float = 40.0, abs_db: float = -60.0) -> np.ndarray:
    """True for frames quieter than ``rel_db`` below the loudest frame or below ``abs_db``."""
    return (energy_db < energy_db.max() - rel_db) | (energy_db < abs_db)


def word_features(
    audio: np.ndarray, sr: int, word_starts: np.ndarray, *, fmin: float = 60.0,
    fmax: float = 500.0, slope_window_s: float = 0.25
) -> np.ndarray:
    """Raw per-word features (n_words, 5) in the order of :data:`FEATURE_NAMES`:

    duration (s, first to last non-silent frame of the word's span), pause after the word (s,
    trailing silence of the span; a word's span runs to the next word's start, the last word's
    to the end of the audio), pitch level (mean log2 F0 over voiced frames), pitch slope
    (octaves/s, least-squares over the last ``slope_window_s`` of voiced frames) and energy
    (mean RMS dB over the non-silent frames). Words without voiced frames get NaN pitch.
    """
    # F0 below 500 Hz needs no more than 11 kHz; halve 22.05 kHz audio for speed.
    factor = 2 if sr >= 16000 else 1
    x = signal.resample_poly(audio, 1, factor) if factor > 1 else np.asarray(audio, np.float64)
    sr_a = sr // factor if factor > 1 else sr
    f0, _ = yin(x, sr_a, fmin=fmin, fmax=fmax)
    energy = rms_db(audio, sr)
    n = min(len(f0), len(energy))
    f0, energy = f0[:n], energy[:n]
    silent = silence_mask(energy)
    f0 = np.where(silent, np.nan, f0)
    hop = int(round(HOP_S * sr))
    starts = np.asarray(word_starts, np.int64)
    bounds = np.append(starts, len(audio))
    out = np.zeros((len(starts), len(FEATURE_NAMES)))
    for i in range(len(starts)):
        # Frames lying wholly inside the word's span [start_i, start_{i+1}).
        a = min(int(-(-bounds[i] // hop)), n)
        b = min(max(a, int(bounds[i + 1] // hop)), n)
        speech = np.flatnonzero(~silent[a:b])
        if len(speech):
            s0, s1 = a + speech[0], a + speech[-1] + 1
            duration = (s1 - s0) * hop / sr
            pause = max(0.0, (bounds[i + 1] - s1 * hop) / sr)
        else:  # the engine gave this word no audible frames of its own
            s0 = s1 = a
            duration, pause = 0.0, (bounds[i + 1] - bounds[i]) / sr
        voiced = np.flatnonzero(np.isfinite(f0[s0:s1])) + s0
        if len(voiced):
            logf = np.log2(f0[voiced])
            level = float(np.mean(logf))
            tail = voiced[voiced >= voiced[-1] - slope_window_s * sr / hop]
            if len(tail) >= 3:
                slope = float(np.polyfit(tail * hop / sr, np.log2(f0[tail]), 1)[0])
            else:
                slope = 0.0
        else:
            level, slope = np.nan, 0.0
        en = float(np.mean(energy[s0:s1])) if s1 > s0 else float(np.min(energy))
        out[i] = (duration, pause, level, slope, en)
    return out


def normalize_per_utterance(feats: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Z-score each feature over the words of one utterance; NaNs (unvoiced words) become 0,
    the utterance mean. A feature that is constant in the utterance maps to 0."""
    f = np.asarray(feats, np.float64)
    mean = np.nanmean(np.where(np.isfinite(f), f, np.nan), axis=0) if len(f) else np.zeros(f.shape[1])
    mean = np.nan_to_num(mean)
    centred = f - mean
    std = np.sqrt(np.nanmean(centred**2, axis=0)) if len(f) else np.ones(f.shape[1])
    std = np.nan_to_num(std)
    z = centred / (std + eps)
    return np.nan_to_num(z, nan=0.0).astype(np.float32)
