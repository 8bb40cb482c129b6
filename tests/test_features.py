"""Filterbank extraction: agreement with an independent numpy Kaldi fbank, frame
counts, and audio validation errors that name the file."""
import os

import numpy as np
import pytest
import soundfile as sf

from fairseq_gdps.data import features as F


# ----------------------------------------------------------------------------
# Independent reference: Kaldi's ComputeFbank (= torchaudio.compliance.kaldi.fbank
# defaults with num_mel_bins=80, dither 0), written from the Kaldi recipe in float64.


def _mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_banks(num_bins, padded, sr, low=20.0, high=0.0):
    nyquist = 0.5 * sr
    high = nyquist + high if high <= 0 else high
    num_fft_bins = padded // 2
    fft_bin_width = sr / padded
    mel_low, mel_high = _mel(low), _mel(high)
    delta = (mel_high - mel_low) / (num_bins + 1)
    mels = _mel(fft_bin_width * np.arange(num_fft_bins))
    w = np.zeros((num_bins, num_fft_bins))
    for b in range(num_bins):
        left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
        up = (mels - left) / (center - left)
        down = (right - mels) / (right - center)
        inside = (mels > left) & (mels < right)
        w[b] = np.where(inside, np.where(mels <= center, up, down), 0.0)
    return w


def reference_fbank(samples, sr=16000, num_bins=80):
    """samples already at int16 scale."""
    x = np.asarray(samples, dtype=np.float64)
    win, shift = int(0.025 * sr), int(0.010 * sr)
    if len(x) < win:
        return np.zeros((0, num_bins))
    n = 1 + (len(x) - win) // shift
    frames = np.stack([x[i * shift : i * shift + win] for i in range(n)])
    frames = frames - frames.mean(axis=1, keepdims=True)  # remove DC
    pre = frames.copy()
    pre[:, 1:] = frames[:, 1:] - 0.97 * frames[:, :-1]  # pre-emphasis
    pre[:, 0] = frames[:, 0] - 0.97 * frames[:, 0]
    i = np.arange(win)
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * i / (win - 1))) ** 0.85
    padded = 1 << (win - 1).bit_length()  # 512
    spec = np.abs(np.fft.rfft(pre * povey, n=padded, axis=1)) ** 2
    energies = spec[:, : padded // 2] @ _mel_banks(num_bins, padded, sr).T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps))


# ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [400, 401, 559, 560, 8000, 16123])
def test_fbank_matches_numpy_kaldi_reference(n):
    rng = np.random.RandomState(n)
    wav = rng.uniform(-0.5, 0.5, n).astype(np.float32)
    wav[: n // 3] *= 0.001  # a quiet stretch: small energies in the log domain
    got = F.compute_fbank(wav)
    ref = reference_fbank(wav.astype(np.float64) * 2**15)
    assert got.dtype == np.float32 and got.shape == ref.shape == (1 + (n - 400) // 160, 80)
    assert np.max(np.abs(got - ref)) < 1e-3


def test_waveform_is_scaled_to_int16_range():
    wav = np.random.RandomState(0).uniform(-0.3, 0.3, 4000).astype(np.float32)
    got = F.compute_fbank(wav)
    # unscaled input would be 2*log(32768) ~ 20.8 lower in every bin
    assert np.max(np.abs(got - reference_fbank(wav * 2**15))) < 1e-3
    assert np.min(np.abs(got - reference_fbank(wav))) > 15


def test_silence_hits_log_floor_and_is_deterministic():
    assert np.allclose(F.compute_fbank(np.zeros(1600, np.float32)), np.log(np.finfo(np.float32).eps))
    wav = np.random.RandomState(1).randn(3200).astype(np.float32) * 0.1
    a, b = F.compute_fbank(wav), F.compute_fbank(wav)
    assert np.array_equal(a, b)  # dither is off


@pytest.mark.parametrize("n", [0, 1, 399, 400, 401, 559, 560, 561, 16000, 16001, 48123])
def test_frame_count_formula(n):
    expected = 0 if n < 400 else 1 + (n - 400) // 160
    assert F.num_frames(n) == expected
    assert F.compute_fbank(np.full(n, 0.01, np.float32)).shape == (expected, 80)


def test_npy_bytes_round_trip():
    feats = F.compute_fbank(np.random.RandomState(2).randn(2000).astype(np.float32) * 0.1)
    import io

    back = np.load(io.BytesIO(F.npy_bytes(feats)))
    assert back.dtype == np.float32 and np.array_equal(back, feats)


# ---------------------------------------------------------------- audio validation


def _wav(path, n=8000, sr=16000, channels=1, subtype="PCM_16", data=None):
    if data is None:
        data = np.random.RandomState(0).uniform(-0.3, 0.3, (n, channels) if channels > 1 else n)
    sf.write(str(path), data, sr, subtype=subtype)
    return str(path)


def test_extract_file_reads_like_fairseq(tmp_path):
    p = _wav(tmp_path / "ok.wav", n=16000)
    feats = F.extract_file(p)
    wav, sr = sf.read(p, dtype="float32")
    assert sr == 16000
    assert np.array_equal(feats, F.compute_fbank(wav))
    assert feats.shape == (98, 80)


def test_wrong_sample_rate_names_file(tmp_path):
    p = _wav(tmp_path / "eight_k.wav", sr=8000)
    with pytest.raises(F.AudioError, match=r"eight_k\.wav: sample rate 8000 Hz, expected 16000"):
        F.extract_file(p)


def test_stereo_names_file(tmp_path):
    p = _wav(tmp_path / "stereo.wav", channels=2)
    with pytest.raises(F.AudioError, match=r"stereo\.wav: 2 channels"):
        F.extract_file(p)


def test_empty_and_garbage_files(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(F.AudioError, match=r"empty\.wav: empty file"):
        F.extract_file(str(empty))
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(F.AudioError, match=r"junk\.wav: cannot read audio"):
        F.extract_file(str(junk))
    with pytest.raises(F.AudioError, match=r"nowhere\.wav: audio file not found"):
        F.extract_file(str(tmp_path / "nowhere.wav"))
    header_only = _wav(tmp_path / "zero.wav", data=np.zeros(0))
    with pytest.raises(F.AudioError, match=r"zero\.wav: .*empty"):
        F.extract_file(header_only)


def test_truncated_wav_detected(tmp_path):
    p = _wav(tmp_path / "cut.wav", n=16000)
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[: len(data) - 5001])
    assert sf.info(p).frames > 0  # libsndfile alone would happily read it
    with pytest.raises(F.AudioError, match=r"cut\.wav: truncated"):
        F.extract_file(p)


def test_duration_mismatch_and_too_short(tmp_path):
    p = _wav(tmp_path / "one_sec.wav", n=16000)
    F.extract_file(p, declared_duration=1.0)
    with pytest.raises(F.AudioError, match=r"one_sec\.wav: duration 1\.000 s but the TSV says 2"):
        F.extract_file(p, declared_duration=2.0)
    short = _wav(tmp_path / "short.wav", n=300)
    with pytest.raises(F.AudioError, match=r"short\.wav: too short: 300 samples"):
        F.extract_file(short)


def test_non_finite_samples(tmp_path):
    data = np.random.RandomState(3).uniform(-0.3, 0.3, 4000).astype(np.float32)
    data[100] = np.nan
    p = _wav(tmp_path / "nan.wav", data=data, subtype="FLOAT")
    with pytest.raises(F.AudioError, match=r"nan\.wav: audio contains NaN"):
        F.extract_file(p)


def test_non_finite_features_rejected(tmp_path, monkeypatch):
    p = _wav(tmp_path / "fine.wav", n=4000)
    monkeypatch.setattr(F, "compute_fbank", lambda *a, **k: np.full((23, 80), np.inf, np.float32))
    with pytest.raises(F.AudioError, match=r"fine\.wav: features contain NaN or infinite"):
        F.extract_file(p)
    assert os.path.isfile(p)
