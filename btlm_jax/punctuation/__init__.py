"""On-device unspoken punctuation prediction (Soboleva et al., ICASSP 2021).

text.py        punctuated prose -> utterances, ASR-style words and labels
tts.py         espeak-ng via its C API (ctypes): audio and word boundaries
features.py    YIN pitch, RMS energy, silence, per-word acoustic features
synth.py       dataset builder with an incremental cache (``python -m btlm_jax.punctuation.synth``)
projection.py  hashed ternary token projection
model.py       bidirectional QRNN (fo-pooling as an associative scan) + classifier
data.py        Grain pipeline
main.py        train/evaluate text-only vs multi-modal (``python -m btlm_jax.punctuation.main``)
"""
