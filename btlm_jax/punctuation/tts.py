"""espeak-ng text-to-speech through its C API (ctypes), with word boundaries from word events.

The library and its voice data come from the ``espeakng-loader`` wheel on PyPI. The engine runs in
synchronous retrieval mode: ``espeak_Synth`` returns when the whole utterance is synthesised, and our
callback has collected the 16-bit samples and the events (``espeakEVENT_WORD`` carries the character
position of the word in the text and the sample index where it starts).

espeak-ng keeps global state, so there is one engine per process (:func:`get_engine`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import re

import numpy as np

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_EE_ERRORS = {1: "EE_INTERNAL_ERROR", 2: "EE_BUFFER_FULL / voice not found", 3: "EE_NOT_FOUND"}


class EspeakError(RuntimeError):
    """espeak-ng is missing or refused a request; the message says what to do."""


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character position in the text
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # milliseconds
        ("sample", ctypes.c_int),  # sample index
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),  # union {int number; const char *name; char string[8]}
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))


@dataclasses.dataclass
class Synthesis:
    """A synthesised utterance."""

    audio: np.ndarray  # float32 in [-1, 1]
    sample_rate: int
    word_starts: np.ndarray  # int64 sample index where each whitespace-separated word starts
    n_events: int  # word events the engine emitted (words merged by the engine share a start)


class EspeakEngine:
    """One espeak-ng instance. Use :func:`get_engine` rather than constructing it directly."""

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as e:
            raise EspeakError(
                "the espeak-ng library is not installed; install it with "
                "`pip install 'espeakng-loader>=0.2.4,<0.3'` (or `pip install btlm_jax[speech]`)"
            ) from e
        try:
            self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data_path = espeakng_loader.get_data_path()
        except (OSError, RuntimeError) as e:
            raise EspeakError(
                f"could not load espeak-ng from espeakng-loader ({e}); reinstall it with "
                "`pip install --force-reinstall espeakng-loader`"
            ) from e
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
        if self.sample_rate <= 0:
            raise EspeakError(f"espeak_Initialize failed with data path {data_path!r}")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int]] = []
        self._cb = _CALLBACK(self._on_synth)  # keep a reference: the C side holds the pointer
        lib.espeak_SetSynthCallback(self._cb)
        self._voice: tuple[str, int, int] | None = None

    def _on_synth(self, wav, n, events):
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            e = events[i]
            if e.type == _EVENT_WORD:
                self._events.append((e.text_position - 1, e.length, e.sample))
            i += 1
        return 0

    def set_voice(self, voice: str, rate: int, pitch: int = 50) -> None:
        """Select a voice such as ``en-us`` or ``en+f3`` (language+variant), words per minute and
        base pitch (0..100)."""
        if self._voice == (voice, rate, pitch):
            return
        err = self._lib.espeak_SetVoiceByName(voice.encode())
        if err != 0:
            raise EspeakError(
                f"espeak-ng has no voice {voice!r} ({_EE_ERRORS.get(err, err)}); use a language "
                "name from espeak-ng-data/lang (e.g. 'en', 'en-us') optionally with a variant "
                "from espeak-ng-data/voices/!v (e.g. 'en-us+f3')"
            )
        if not 80 <= rate <= 450:
            raise EspeakError(f"speaking rate {rate} wpm is outside espeak-ng's range 80..450")
        self._lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        self._lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        self._voice = (voice, rate, pitch)

    def synthesize(self, text: str) -> Synthesis:
        """Synthesise ``text`` (ASCII prose) and locate each whitespace-separated word."""
        if not text.strip():
            raise ValueError("cannot synthesise empty text")
        if self._voice is None:
            raise EspeakError("call set_voice(...) before synthesize(...)")
        self._chunks, self._events = [], []
        data = text.encode("utf-8")
        buf = ctypes.create_string_buffer(data)
        err = self._lib.espeak_Synth(buf, len(data) + 1, 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8,
                                     None, None)
        if err != 0:
            raise EspeakError(f"espeak_Synth failed ({_EE_ERRORS.get(err, err)}) on {text[:60]!r}")
        self._lib.espeak_Synchronize()
        audio = (np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16))
        audio = audio.astype(np.float32) / 32768.0
        starts = align_word_events(text, self._events, len(audio))
        return Synthesis(audio, self.sample_rate, starts, len(self._events))


def align_word_events(text: str, events: list[tuple[int, int, int]], n_samples: int) -> np.ndarray:
    """Start sample of every whitespace-separated word of ``text`` from (char_pos, len, sample)
    word events.

    An event belongs to the word whose characters contain its position, or to the next word if
    it points at the whitespace or punctuation before it (espeak-ng is sometimes one character
    early). The engine may read several words as one (``I am``): those words get no event of
    their own, so the span of the event is shared among them in proportion to their lengths.
    The result is non-decreasing and lies in [0, n_samples].
    """
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    n = len(spans)
    start = np.full(n, -1, dtype=np.int64)
    ends = np.array([e for _, e in spans])
    for pos, _length, sample in events:
        w = int(np.searchsorted(ends, pos, side="right"))  # first word ending after pos
        if w < n and start[w] < 0:
            start[w] = sample
    if n == 0:
        return start
    if start[0] < 0:
        start[0] = 0
    # Enforce monotonicity (an out-of-order event is dropped and treated as missing).
    last = start[0]
    for i in range(1, n):
        if start[i] >= 0 and start[i] < last:
            start[i] = -1
        if start[i] >= 0:
            last = start[i]
    # Fill words without an event: share the span from the previous known start to the next one.
    i = 0
    while i < n:
        if start[i] >= 0:
            i += 1
            continue
        j = i
        while j < n and start[j] < 0:
            j += 1
        a = i - 1  # known start before the gap
        b_sample = start[j] if j < n else n_samples
        lengths = np.array([spans[k][1] - spans[k][0] for k in range(a, j)], dtype=np.float64)
        cum = np.cumsum(lengths) / lengths.sum()
        for k, frac in zip(range(i, j), cum[:-1]):
            start[k] = int(start[a] + frac * (b_sample - start[a]))
        i = j
    return np.clip(start, 0, n_samples)


_ENGINE: EspeakEngine | None = None


def get_engine() -> EspeakEngine:
    """The process-wide espeak-ng engine (initialised on first use)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = EspeakEngine()
    return _ENGINE
