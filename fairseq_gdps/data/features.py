"""80-dim log-mel filterbank features, Kaldi-compatible, via kaldi-native-fbank.

The settings are those of ``torchaudio.compliance.kaldi.fbank`` with
``num_mel_bins=80`` as used by fairseq's speech-to-text preparation scripts:
25 ms povey window, 10 ms shift, no dither (deterministic), pre-emphasis 0.97,
DC removal, snip edges, 512-point FFT, power spectrum, 20 Hz .. Nyquist mel
banks, ``log(max(energy, FLT_EPSILON))``.  The waveform is scaled to the int16
range first (fairseq multiplies normalised samples by 2**15).

This module deliberately imports neither fairseq nor torch, so that it is cheap
to use in worker processes.
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0


class AudioError(ValueError):
    """A problem with one audio file (message names the file)."""


def frame_length_samples(sample_rate: int = SAMPLE_RATE) -> int:
    return int(sample_rate * FRAME_LENGTH_MS / 1000)


def frame_shift_samples(sample_rate: int = SAMPLE_RATE) -> int:
    return int(sample_rate * FRAME_SHIFT_MS / 1000)


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Kaldi frame count with snip_edges=True: 1 + (n - 400) // 160 at 16 kHz."""
    win, shift = frame_length_samples(sample_rate), frame_shift_samples(sample_rate)
    if num_samples < win:
        return 0
    return 1 + (num_samples - win) // shift


def fbank_options(num_mel_bins: int = NUM_MEL_BINS, sample_rate: int = SAMPLE_RATE):
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    fo = opts.frame_opts
    fo.samp_freq = float(sample_rate)
    fo.frame_shift_ms = FRAME_SHIFT_MS
    fo.frame_length_ms = FRAME_LENGTH_MS
    fo.dither = 0.0  # knf's default is 3e-5, Kaldi's 1.0, torchaudio's 0.0
    fo.preemph_coeff = 0.97
    fo.remove_dc_offset = True
    fo.window_type = "povey"
    fo.round_to_power_of_two = True
    fo.blackman_coeff = 0.42
    fo.snip_edges = True
    mo = opts.mel_opts
    mo.num_bins = num_mel_bins
    mo.low_freq = 20.0
    mo.high_freq = 0.0  # 0 => Nyquist
    mo.vtln_low = 100.0
    mo.vtln_high = -500.0
    mo.htk_mode = False
    mo.is_librosa = False
    opts.use_energy = False
    opts.raw_energy = True
    opts.htk_compat = False
    opts.use_log_fbank = True
    opts.use_power = True
    return opts


def compute_fbank(
    waveform: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = NUM_MEL_BINS,
    scale: float = 2**15,
) -> np.ndarray:
    """Log-mel filterbank of a mono waveform.

    ``waveform`` holds samples normalised to [-1, 1] (as soundfile returns them);
    they are multiplied by ``scale`` (2**15, fairseq's "Kaldi compliance" step)
    before feature extraction.  Returns float32 of shape (frames, num_mel_bins);
    zero frames when the waveform is shorter than one 25 ms window.
    """
    import kaldi_native_fbank as knf

    x = np.asarray(waveform, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {x.shape}")
    x = x * np.float32(scale)
    fb = knf.OnlineFbank(fbank_options(num_mel_bins, sample_rate))
    fb.accept_waveform(float(sample_rate), x)
    fb.input_finished()
    n = fb.num_frames_ready
    if n == 0:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    return np.stack([fb.get_frame(i) for i in range(n)]).astype(np.float32, copy=False)


def npy_bytes(features: np.ndarray) -> bytes:
    """Serialise like ``np.save`` (what fairseq stores in its fbank zip)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- audio


def _wav_truncation(path: str) -> Optional[str]:
    """For RIFF/WAVE files: describe a 'data' chunk that claims more bytes than the
    file holds (libsndfile silently reads what is there), else None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                hdr = f.read(8)
                if len(hdr) < 8:
                    return None
                cid, clen = hdr[:4], struct.unpack("<I", hdr[4:])[0]
                if cid == b"data":
                    if clen in (0, 0xFFFFFFFF):  # streaming writers: size unknown
                        return None
                    have = size - pos - 8
                    if have < clen:
                        return f"truncated: data chunk declares {clen} bytes, file holds {have}"
                    return None
                pos += 8 + clen + (clen & 1)
    except OSError:
        return None
    return None


@dataclass
class AudioInfo:
    num_samples: int
    sample_rate: int
    channels: int


def read_audio(
    path: str, expected_sample_rate: int = SAMPLE_RATE
) -> Tuple[np.ndarray, AudioInfo]:
    """Read a mono audio file at the expected rate as float32 in [-1, 1].

    Raises AudioError (message naming ``path``) for a missing, empty, unreadable,
    truncated, multi-channel, wrongly sampled or non-finite file.
    """
    import soundfile as sf

    if not os.path.isfile(path):
        raise AudioError(f"{path}: audio file not found")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        with sf.SoundFile(path) as f:
            sr, ch, frames = f.samplerate, f.channels, f.frames
            if sr != expected_sample_rate:
                raise AudioError(
                    f"{path}: sample rate {sr} Hz, expected {expected_sample_rate} Hz"
                )
            if ch != 1:
                raise AudioError(f"{path}: {ch} channels, expected mono (1 channel)")
            wav = f.read(dtype="float32", always_2d=False)
    except AudioError:
        raise
    except Exception as e:  # soundfile.LibsndfileError, RuntimeError, ...
        reason = str(e).strip().replace(f"Error opening {path!r}: ", "")  # libsndfile repeats the path
        raise AudioError(f"{path}: cannot read audio ({reason})") from None
    trunc = _wav_truncation(path)
    if trunc is not None:
        raise AudioError(f"{path}: {trunc}")
    if wav.ndim != 1:
        wav = wav.reshape(-1)
    if len(wav) != frames:
        raise AudioError(f"{path}: truncated: header says {frames} samples, read {len(wav)}")
    if len(wav) == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    if not np.all(np.isfinite(wav)):
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    return wav, AudioInfo(len(wav), sr, ch)


def extract_file(
    path: str,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = NUM_MEL_BINS,
    declared_duration: Optional[float] = None,
) -> np.ndarray:
    """Features of one audio file, validated (raises AudioError naming the file)."""
    wav, info = read_audio(path, sample_rate)
    if declared_duration is not None:
        actual = info.num_samples / sample_rate
        if abs(actual - declared_duration) > max(0.05, 0.01 * declared_duration):
            raise AudioError(
                f"{path}: duration {actual:.3f} s but the TSV says {declared_duration:g} s "
                "(truncated or wrong file?)"
            )
    if num_frames(info.num_samples, sample_rate) == 0:
        raise AudioError(
            f"{path}: too short: {info.num_samples} samples, one "
            f"{FRAME_LENGTH_MS:g} ms frame needs {frame_length_samples(sample_rate)}"
        )
    feats = compute_fbank(wav, sample_rate, num_mel_bins)
    check_finite_features(feats, path)
    return feats


def check_finite_features(feats: np.ndarray, name: str) -> None:
    """Raise AudioError naming ``name`` and the first non-finite value when ``feats``
    (frames x bins) holds NaN or infinity: one such frame would make the loss NaN."""
    bad = ~np.isfinite(feats)
    if bad.any():
        frame, mel_bin = (int(i) for i in np.argwhere(bad)[0])
        raise AudioError(
            f"{name}: features contain NaN or infinite values ({int(bad.sum())} of {feats.size}; "
            f"first at frame {frame}, bin {mel_bin}: {feats[frame, mel_bin]})"
        )
