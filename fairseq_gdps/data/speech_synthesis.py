"""Speech synthesis for the demo corpus: espeak-ng (through its shared library, or one process
per utterance), the post-processing that turns its output into 16 kHz utterance files, and the
Arabic vowel marks espeak-ng needs to read Arabic text.

:mod:`fairseq_gdps.data.corpus` decides what is said, by whom and in which split; this module
only turns (text, voice, rate, pitch, word gap, gain) into a wav file. ``_synth_chunk`` runs in a
fresh worker process per chunk of utterances (espeak-ng keeps a little state between
utterances), so the output of a chunk does not depend on what was synthesised before.

Pure Python + numpy/scipy (mishkal for Arabic); no fairseq import.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import wave
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fairseq_gdps.data import cldr_text as ct
from fairseq_gdps.process_pool import parallel_map

SAMPLE_RATE = 16000
PAD_SECONDS = 0.1  # silence kept before and after the speech
ESPEAK_VOLUME = 25  # espeak default 100 (and even 50) clips for some variants


class SynthesisUnavailable(ValueError):
    """espeak-ng (or the requested backend) cannot be used on this machine; the message says why."""


# --------------------------------------------------------------------------- Arabic
#: Vowelling for frequent words of the domain that mishkal gets wrong or leaves
#: bare (checked by hand; pausal forms, no case endings).  Applied word by word
#: after mishkal, keyed by the undiacritised word.
AR_FIXES = {
    "قبل": "قَبْلَ", "خلال": "خِلَالَ", "عشر": "عَشَرَ", "عشرة": "عَشَرَة", "أحد": "أَحَدَ",
    "اثنان": "اِثْنَانِ", "اثنا": "اِثْنَا", "اثنتان": "اِثْنَتَانِ", "سنتين": "سَنَتَيْنِ", "سنتان": "سَنَتَانِ",
    "لتر": "لِتْر", "كيلوغرام": "كِيلُوغْرَام", "سنتيمتر": "سَنْتِيمِتْر", "كيلومتر": "كِيلُومِتْر",
    "كيلومترا": "كِيلُومِتْرًا", "كيلومترات": "كِيلُومِتْرَات", "أشهر": "أَشْهُر", "سنوات": "سَنَوَات",
    "مائة": "مِائَة", "مليمتر": "مِلِّيمِتْر", "مليلتر": "مِلِّيلِتْر", "هكتار": "هِكْتَار",
    "ميغابايت": "مِيغَابَايْت", "يورو": "يُورُو",
}
_TASHKEEL = None


def _vowel_fix(word: str) -> str:
    return AR_FIXES.get(ct.strip_harakat(word), word)


def _tashkeel_batch(texts: Sequence[str]) -> List[str]:
    import logging

    global _TASHKEEL
    # mishkal and its helpers log every word at DEBUG level (and may lower the root level).
    root_level, disabled = logging.root.level, logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        if _TASHKEEL is None:
            import mishkal.tashkeel

            _TASHKEEL = mishkal.tashkeel.TashkeelClass()
        out = []
        for t in texts:
            d = " ".join(_TASHKEEL.tashkeel(t).split())
            # mishkal sometimes drops or changes words: keep the input then.
            if ct.strip_harakat(d).split() != ct.strip_harakat(t).split():
                d = t
            out.append(" ".join(_vowel_fix(w) for w in d.split()))
    finally:
        logging.root.setLevel(root_level)
        logging.disable(disabled)
    return out


def diacritise(texts: Sequence[str], jobs: int = 1) -> Dict[str, str]:
    """Arabic text -> text with vowel marks (mishkal), one call per distinct text."""
    texts = sorted(set(texts))
    if not texts:
        return {}
    if jobs <= 1 or len(texts) < 64:
        res = _tashkeel_batch(texts)
    else:
        n = min(jobs, len(texts))
        parts = [texts[i::n] for i in range(n)]
        with parallel_map(_tashkeel_batch, parts, n) as batches:
            outs = list(batches)
        res = [None] * len(texts)
        for i in range(n):
            res[i::n] = outs[i]
    return dict(zip(texts, res))


# --------------------------------------------------------------------------- synthesis (workers)
_ENGINE = None


class _EspeakLib:
    """espeak-ng through its shared library (about 3x faster than a process per utterance)."""

    def __init__(self):
        import ctypes

        lib = ctypes.CDLL("libespeak-ng.so.1")
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        # AUDIO_OUTPUT_SYNCHRONOUS=2; espeakINITIALIZE_DONT_EXIT=0x8000
        self.sample_rate = lib.espeak_Initialize(2, 0, None, 0x8000)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak_Initialize failed")
        self._chunks: List[np.ndarray] = []
        cbtype = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

        def _cb(wav, n, events):
            if n > 0 and wav:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._cb = cbtype(_cb)  # keep a reference
        lib.espeak_SetSynthCallback(self._cb)
        self.lib = lib

    def synth(self, text: str, voice: str, rate: int, pitch: int, wordgap: int) -> np.ndarray:
        lib = self.lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        for param, value in ((1, rate), (2, ESPEAK_VOLUME), (3, pitch), (7, wordgap)):
            lib.espeak_SetParameter(param, int(value), 0)
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        # POS_CHARACTER=1, espeakCHARS_UTF8=1
        if lib.espeak_Synth(data, len(data), 0, 1, 0, 1, None, None) != 0:
            raise RuntimeError(f"espeak_Synth failed for {text!r}")
        lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


class _EspeakCli:
    """espeak-ng as a subprocess per utterance (fallback)."""

    sample_rate = 22050

    def __init__(self):
        self.exe = shutil.which("espeak-ng")
        if not self.exe:
            raise RuntimeError("espeak-ng not found on PATH")

    def synth(self, text: str, voice: str, rate: int, pitch: int, wordgap: int) -> np.ndarray:
        cmd = [self.exe, "-v", voice, "-s", str(rate), "-p", str(pitch), "-a", str(ESPEAK_VOLUME),
               "-g", str(wordgap), "-b", "1", "--stdin", "--stdout"]
        res = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, check=True)
        raw = res.stdout
        # The RIFF/data sizes in the header are bogus with --stdout: parse by hand.
        fmt = raw.find(b"fmt ")
        data = raw.find(b"data")
        if raw[:4] != b"RIFF" or fmt < 0 or data < 0:
            raise RuntimeError(f"espeak-ng gave no wav for {text!r}: {res.stderr[:200]!r}")
        self.sample_rate = int.from_bytes(raw[fmt + 12:fmt + 16], "little")
        body = raw[data + 8:]
        return np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2").astype(np.int16)


def _engine(backend: str):
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _EspeakLib() if backend == "lib" else _EspeakCli()
    return _ENGINE


def resolve_backend(backend: str) -> str:
    if backend in ("auto", "lib"):
        try:
            import ctypes

            ctypes.CDLL("libespeak-ng.so.1")
            return "lib"
        except OSError:
            if backend == "lib":
                raise SynthesisUnavailable("--tts-backend lib: libespeak-ng.so.1 cannot be loaded")
    if not shutil.which("espeak-ng"):
        raise SynthesisUnavailable("espeak-ng is not installed (apt-get install espeak-ng)")
    return "cli"


def _postprocess(x: np.ndarray, sr: int, gain: float, snr_db: Optional[float], noise_key) -> np.ndarray:
    from scipy.signal import resample_poly

    y = x.astype(np.float64) / 32768.0
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if peak <= 0:
        raise RuntimeError("espeak-ng produced silence")
    idx = np.nonzero(np.abs(y) > 0.02 * peak)[0]
    y = y[idx[0]: idx[-1] + 1]
    if sr != SAMPLE_RATE:
        g = math.gcd(SAMPLE_RATE, sr)
        y = resample_poly(y, SAMPLE_RATE // g, sr // g)
    pad = np.zeros(int(round(PAD_SECONDS * SAMPLE_RATE)))
    speech_power = float(np.mean(y ** 2))
    y = np.concatenate([pad, y, pad])
    scale = gain / float(np.max(np.abs(y)))
    y = y * scale
    if snr_db is not None:
        rng = np.random.default_rng(noise_key)
        noise_std = math.sqrt(speech_power * scale * scale / (10.0 ** (snr_db / 10.0)))
        y = y + rng.standard_normal(len(y)) * noise_std
    return np.clip(np.round(y * 32767.0), -32768, 32767).astype("<i2")


def write_wav(path: str, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    tmp = path + ".tmp"
    with wave.open(tmp, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(np.asarray(samples, dtype="<i2").tobytes())
    os.replace(tmp, path)


def _synth_chunk(task) -> List[Tuple[int, float]]:
    """Worker: synthesise, post-process and write one chunk; returns (samples, rms) per item."""
    backend, out_dir, snr_db, items = task
    eng = _engine(backend)
    out = []
    for rel, voice, rate, pitch, gap, gain, text, noise_key in items:
        raw = eng.synth(text, voice, rate, pitch, gap)
        try:
            y = _postprocess(raw, eng.sample_rate, gain, snr_db, noise_key)
        except RuntimeError as e:
            raise RuntimeError(f"{e} for {voice} {text!r}") from None
        write_wav(os.path.join(out_dir, rel), y)
        out.append((len(y), float(np.sqrt(np.mean((y.astype(np.float64) / 32768.0) ** 2)))))
    return out


def espeak_version() -> Optional[str]:
    """``espeak-ng --version`` without the data path (None when espeak-ng cannot be run)."""
    try:
        return subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.split("Data at")[0].strip()
    except (OSError, subprocess.SubprocessError):
        return None
