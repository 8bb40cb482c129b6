"""Shared part of the corpus preparers: segments, audio cutting/resampling, the corpus TSVs.

A preparer lists :class:`Segment` s (an utterance: source audio file, optional start/end times,
translation, ...).  :func:`write_corpus` checks every segment against its recording (file present
and readable, 0 <= start < end <= recording end), and

- references a file *in place* (absolute path) when the segment is the whole file and the file is
  already 16 kHz mono (per-utterance releases: BIG-C, Irish, Estonian), unless ``copy_audio``;
- otherwise reads the recording once, mixes it down to mono (mean of the channels), resamples it
  to 16 kHz with ``scipy.signal.resample_poly`` and writes each segment as a 16-bit wav under
  ``OUT/wav/<split>/<id>.wav`` (long recordings + segment times: Tunisian, Kaldi ``segments``).

Segment boundaries are ``round(t * 16000)`` samples of the 16 kHz signal (as fairseq's MuST-C
preparation cuts at ``int(t * sample_rate)`` frame offsets, but rounded, so that times written
with 3 decimals land on the intended sample).  It then writes ``OUT/{split}.tsv`` (what
``gdps-prep --corpus OUT`` reads; audio paths relative to OUT or absolute), ``OUT/prep_corpus.json``
and, with ``skip_bad``, ``OUT/skipped.tsv``; every file is written atomically.

Errors name the file and line of the release that defined the bad segment
(:class:`~fairseq_gdps.data.manifest.BadLine`); by default the first one stops the run, with
``skip_bad`` they are skipped and listed.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
import tempfile
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from fairseq_gdps.atomic import atomic_write
from fairseq_gdps.data.manifest import BadLine, PrepError
from fairseq_gdps.process_pool import parallel_map

SAMPLE_RATE = 16000
MIN_SAMPLES = 400  # one 25 ms fbank frame at 16 kHz: gdps-prep rejects anything shorter
SPLITS = ("train", "dev", "test")
CORPUS_COLUMNS = ("id", "audio", "src_lang", "tgt_lang", "tgt_text", "src_text", "speaker", "duration")
REPORT_NAME = "prep_corpus.json"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@=,-]*$")  # what gdps-prep accepts as an id
LANG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class Segment:
    """One utterance of a release, before its audio is checked."""

    split: str  # train / dev / test
    uid: str
    lang: str
    audio: str  # source recording (absolute path)
    tgt_text: str
    file: str  # release file and line that define this segment (for error messages)
    line: int
    start: Optional[float] = None  # seconds; None: from the beginning
    end: Optional[float] = None  # seconds; None: to the end of the recording
    src_text: str = ""
    speaker: str = ""
    tgt_lang: str = "en"

    def bad(self, reason: str) -> BadLine:
        return BadLine(self.file, self.line, reason)


# ----------------------------------------------------------------------------- text helpers


def clean_text(text: str) -> str:
    """One line of text: whitespace runs (tabs, line breaks included) become one space."""
    return " ".join(text.split())


def read_lines(path: str) -> List[Tuple[int, str]]:
    """(1-based line number, text without the line end) of a UTF-8 text file; a BOM is dropped.
    Missing/unreadable file or bytes that are not UTF-8 raise PrepError naming file:line."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PrepError(f"{path}: cannot read: {e.strerror or e}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    out = []
    for n, bline in enumerate(raw.split(b"\n"), start=1):
        try:
            out.append((n, bline.rstrip(b"\r").decode("utf-8")))
        except UnicodeDecodeError as e:
            raise PrepError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if out and out[-1][1] == "":
        out.pop()
    return out


def parse_time(text: str, what: str) -> float:
    """A time in seconds (finite, >= 0); ValueError with a readable message otherwise."""
    try:
        t = float(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"{what} {text!r} must be a finite number of seconds >= 0")
    return t


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise PrepError(f"{path}: {what} not found")
    return path


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise PrepError(f"{path}: {what} not found")
    return path


def fail(bad: Sequence[BadLine], hint: str = "; use --skip-bad to skip bad lines") -> PrepError:
    """One PrepError for a list of problems: the first (by file and line), the count, a hint."""
    bad = sorted(bad, key=lambda b: (b.file, b.line))
    msg = str(bad[0])
    if len(bad) > 1:
        msg += f" (and {len(bad) - 1} more problem{'s' if len(bad) > 2 else ''})"
    return PrepError(msg + hint)


# ----------------------------------------------------------------------------- audio


def to_mono_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """float32 mono 16 kHz signal from a (samples,) or (samples, channels) array: channels are
    averaged, other rates resampled with a polyphase filter (``resample_poly``, up/down reduced
    by their gcd, its default Kaiser window)."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    if sample_rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        g = math.gcd(SAMPLE_RATE, int(sample_rate))
        x = resample_poly(x, SAMPLE_RATE // g, int(sample_rate) // g).astype(np.float32)
    return x


def sample_range(start: float, end: float) -> Tuple[int, int]:
    """Sample indices [a, b) of a segment in the 16 kHz signal."""
    return int(round(start * SAMPLE_RATE)), int(round(end * SAMPLE_RATE))


def write_wav_atomic(path: str, samples: np.ndarray) -> None:
    """16-bit PCM wav (clipped to [-1, 1]: resampling can overshoot), moved into place complete."""
    import soundfile as sf

    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        sf.write(tmp, np.clip(samples, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="WAV")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class _Options:
    out_dir: str
    copy_audio: bool
    tolerance: float
    max_duration: Optional[float]


@dataclass
class _Result:
    index: int
    audio: str = ""  # path written into the TSV
    duration: float = 0.0
    bad: Optional[BadLine] = None
    dropped: str = ""  # reason the segment was left out on purpose (not an error)


def _process_recording(task: Tuple[str, List[Tuple[int, Segment]], _Options]) -> List[_Result]:
    """All segments of one recording: check times, then reference the file or cut the segments."""
    import soundfile as sf

    path, items, opt = task
    if not os.path.isfile(path):
        return [_Result(i, bad=s.bad(f"{path}: audio file not found")) for i, s in items]
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile.LibsndfileError and friends
        hint = " (shorten-compressed SPHERE? convert it with sph2pipe first)" if path.endswith(".sph") else ""
        reason = f"{path}: cannot read audio ({str(e).strip()}){hint}"
        return [_Result(i, bad=s.bad(reason)) for i, s in items]
    if info.frames <= 0 or info.samplerate <= 0:
        return [_Result(i, bad=s.bad(f"{path}: empty audio (0 samples)")) for i, s in items]
    rec_dur = info.frames / info.samplerate
    results: List[_Result] = []
    to_cut: List[Tuple[int, Segment, float, float]] = []
    for i, s in items:
        start = 0.0 if s.start is None else s.start
        end = rec_dur if s.end is None else s.end
        if s.end is not None and end <= start:
            results.append(_Result(i, bad=s.bad(f"end time {end:g} s is not after start time {start:g} s")))
            continue
        if start >= rec_dur:
            results.append(_Result(i, bad=s.bad(
                f"start time {start:g} s is past the end of {path} ({rec_dur:.3f} s)")))
            continue
        if end > rec_dur + opt.tolerance:
            results.append(_Result(i, bad=s.bad(
                f"end time {end:g} s is past the end of {path} ({rec_dur:.3f} s; tolerance {opt.tolerance:g} s)")))
            continue
        end = min(end, rec_dur)  # within the tolerance: times rounded up past the last sample
        if opt.max_duration is not None and end - start > opt.max_duration:
            results.append(_Result(i, dropped=f"longer than --max-duration {opt.max_duration:g} s ({end - start:.2f} s)"))
            continue
        whole = start <= 0.0 and rec_dur - end <= opt.tolerance
        if whole and not opt.copy_audio and info.samplerate == SAMPLE_RATE and info.channels == 1:
            if info.frames < MIN_SAMPLES:
                results.append(_Result(i, bad=s.bad(f"{path}: too short ({info.frames} samples; one frame needs {MIN_SAMPLES})")))
            else:
                results.append(_Result(i, audio=os.path.abspath(path), duration=info.frames / SAMPLE_RATE))
            continue
        to_cut.append((i, s, start, end))
    if to_cut:
        try:
            data, sr = sf.read(path, dtype="float32", always_2d=True)
        except Exception as e:
            reason = f"{path}: cannot read audio ({str(e).strip()})"
            return results + [_Result(i, bad=s.bad(reason)) for i, s, _, _ in to_cut]
        if not np.all(np.isfinite(data)):
            return results + [_Result(i, bad=s.bad(f"{path}: audio contains NaN or infinite samples"))
                              for i, s, _, _ in to_cut]
        signal = to_mono_16k(data, sr)
        for i, s, start, end in to_cut:
            a, b = sample_range(start, end)
            b = min(b, len(signal))
            if b - a < MIN_SAMPLES:
                results.append(_Result(i, bad=s.bad(
                    f"segment {start:g}-{end:g} s of {path} is too short ({max(b - a, 0)} samples at 16 kHz; "
                    f"one frame needs {MIN_SAMPLES})")))
                continue
            rel = os.path.join("wav", s.split, f"{s.uid}.wav")
            write_wav_atomic(os.path.join(opt.out_dir, rel), signal[a:b])
            results.append(_Result(i, audio=rel, duration=(b - a) / SAMPLE_RATE))
    return results


# ----------------------------------------------------------------------------- corpus TSVs


def corpus_tsv_text(rows: Iterable[Dict[str, str]]) -> str:
    buf = io.StringIO()
    buf.write("\t".join(CORPUS_COLUMNS) + "\n")
    for r in rows:
        buf.write("\t".join(clean_text(str(r.get(c, ""))) for c in CORPUS_COLUMNS) + "\n")
    return buf.getvalue()


def _validate(segments: Sequence[Segment]) -> Tuple[List[int], List[BadLine]]:
    """Indices of segments whose fields are usable, and the problems of the others."""
    ok, bad = [], []
    first: Dict[str, Segment] = {}
    for i, s in enumerate(segments):
        s.tgt_text, s.src_text, s.speaker = clean_text(s.tgt_text), clean_text(s.src_text), clean_text(s.speaker)
        if s.split not in SPLITS:
            bad.append(s.bad(f"unknown split {s.split!r} (expected one of {', '.join(SPLITS)})"))
        elif not ID_RE.match(s.uid):
            bad.append(s.bad(f"invalid utterance id {s.uid!r} (allowed: letters, digits and ._+@=,- )"))
        elif not LANG_RE.match(s.lang) or not LANG_RE.match(s.tgt_lang):
            bad.append(s.bad(f"invalid language code {s.lang!r} / {s.tgt_lang!r}"))
        elif not s.tgt_text:
            bad.append(s.bad("empty translation"))
        elif s.uid in first:
            f = first[s.uid]
            bad.append(s.bad(f"duplicate utterance id {s.uid!r} (first at {f.file}:{f.line})"))
        else:
            first[s.uid] = s
            ok.append(i)
    return ok, bad


def write_corpus(
    segments: Sequence[Segment],
    out_dir: str,
    *,
    bad: Sequence[BadLine] = (),
    skip_bad: bool = False,
    copy_audio: bool = False,
    tolerance: float = 0.05,
    max_duration: Optional[float] = None,
    jobs: int = 1,
    source: Optional[Dict] = None,
    warnings: Sequence[str] = (),
    quiet: bool = False,
) -> Dict:
    """Check, cut and write a corpus folder for gdps-prep; returns the report (prep_corpus.json).

    ``bad`` are problems the reader already found (kept in the same error/skip flow)."""
    if tolerance < 0:
        raise PrepError(f"--time-tolerance must be >= 0, got {tolerance}")
    if max_duration is not None and max_duration <= 0:
        raise PrepError(f"--max-duration must be > 0, got {max_duration}")
    sources = {os.path.abspath(s.file) for s in segments} | {os.path.abspath(b.file) for b in bad}
    for split in SPLITS:
        target = os.path.abspath(os.path.join(out_dir, f"{split}.tsv"))
        if target in sources:
            raise PrepError(f"{out_dir}: the output folder would overwrite the release's own {target}; "
                            "choose another --out")
    bad = list(bad)
    ok, field_bad = _validate(segments)
    bad += field_bad
    if bad and not skip_bad:
        raise fail(bad)
    if not any(segments[i].split == "train" for i in ok):
        raise PrepError("no usable training segments (nothing for split 'train')")
    os.makedirs(out_dir, exist_ok=True)
    opt = _Options(out_dir, copy_audio, tolerance, max_duration)
    groups: "OrderedDict[str, List[Tuple[int, Segment]]]" = OrderedDict()
    for i in ok:
        groups.setdefault(os.path.abspath(segments[i].audio), []).append((i, segments[i]))
    tasks = [(path, items, opt) for path, items in groups.items()]
    results: Dict[int, _Result] = {}
    n_done = 0
    with parallel_map(_process_recording, tasks, jobs, max_chunk=64) as per_recording:
        for res in per_recording:
            for r in res:
                if r.bad is not None and not skip_bad:
                    raise fail([r.bad])
                results[r.index] = r
            n_done += 1
            if not quiet and n_done % 500 == 0:
                print(f"gdps-prep-corpus: {n_done}/{len(tasks)} recordings", file=sys.stderr, flush=True)
    bad += [r.bad for r in results.values() if r.bad is not None]
    dropped = [(segments[i], r.dropped) for i, r in sorted(results.items()) if r.dropped]

    by_split: Dict[str, List[Dict[str, str]]] = defaultdict(list)
    for i in ok:  # release order
        r = results[i]
        if r.bad is not None or r.dropped:
            continue
        s = segments[i]
        by_split[s.split].append({
            "id": s.uid, "audio": r.audio, "src_lang": s.lang, "tgt_lang": s.tgt_lang, "tgt_text": s.tgt_text,
            "src_text": s.src_text, "speaker": s.speaker, "duration": f"{r.duration:.6f}",
        })
    if not by_split["train"]:
        raise PrepError("no usable training segments left after checking the audio")
    counts = {}
    for split in SPLITS:
        rows = by_split.get(split, [])
        if not rows:
            continue
        with atomic_write(os.path.join(out_dir, f"{split}.tsv")) as f:
            f.write(corpus_tsv_text(rows))
        per_lang: Dict[str, int] = defaultdict(int)
        for row in rows:
            per_lang[row["src_lang"]] += 1
        counts[split] = {
            "utterances": len(rows),
            "hours": round(sum(float(row["duration"]) for row in rows) / 3600, 4),
            "written_wavs": sum(1 for row in rows if not os.path.isabs(row["audio"])),
            "per_lang": dict(sorted(per_lang.items())),
        }
    stale = [s for s in SPLITS if s not in counts and os.path.isfile(os.path.join(out_dir, f"{s}.tsv"))]
    for split in stale:  # an earlier run's split that this release does not have
        os.remove(os.path.join(out_dir, f"{split}.tsv"))
    if skip_bad:
        buf = io.StringIO()
        buf.write("file\tline\treason\n")
        for b in sorted(bad, key=lambda b: (b.file, b.line, b.reason)):
            buf.write(f"{clean_text(b.file)}\t{b.line}\t{clean_text(b.reason)}\n")
        with atomic_write(os.path.join(out_dir, "skipped.tsv")) as f:
            f.write(buf.getvalue())
    report = {
        "tool": "gdps-prep-corpus",
        "source": source or {},
        "settings": {"copy_audio": copy_audio, "time_tolerance": tolerance, "max_duration": max_duration,
                     "sample_rate": SAMPLE_RATE, "skip_bad": skip_bad},
        "counts": counts,
        "skipped": len(bad),
        "dropped": len(dropped),
        "dropped_examples": [f"{s.file}:{s.line}: {why}" for s, why in dropped[:20]],
        "warnings": list(warnings),
    }
    with atomic_write(os.path.join(out_dir, REPORT_NAME)) as f:
        f.write(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    if not quiet:
        summary = ", ".join(f"{s} {counts[s]['utterances']} ({counts[s]['hours']:.2f} h)" for s in counts)
        print(f"gdps-prep-corpus: {summary}; skipped {len(bad)}, dropped {len(dropped)} -> {out_dir}",
              file=sys.stderr)
    return report


# ----------------------------------------------------------------------------- merging


def read_corpus_tsv_rows(path: str) -> List[Tuple[int, Dict[str, str]]]:
    """(line, row) of a corpus TSV written by write_corpus (or any gdps-prep input TSV)."""
    lines = read_lines(path)
    if not lines:
        raise PrepError(f"{path}: empty file (a header line is required)")
    header = lines[0][1].split("\t")
    for c in ("id", "audio", "src_lang", "tgt_text"):
        if c not in header:
            raise PrepError(f"{path}:1: missing column {c!r} (header has: {', '.join(header)})")
    rows = []
    for n, text in lines[1:]:
        if not text.strip():
            continue
        fields = text.split("\t")
        if len(fields) != len(header):
            raise PrepError(f"{path}:{n}: {len(fields)} fields, header has {len(header)}")
        rows.append((n, dict(zip(header, fields))))
    return rows


def merge_corpora(inputs: Sequence[str], out_dir: str, quiet: bool = False) -> Dict:
    """One corpus folder from several (one per language): split TSVs concatenated in the order
    given, relative audio paths rewritten relative to ``out_dir``, ids checked to be unique."""
    if not inputs:
        raise PrepError("merge needs at least one corpus folder")
    out_abs = os.path.abspath(out_dir)
    for d in inputs:
        require_dir(d, "corpus folder")
        if os.path.abspath(d) == out_abs:
            raise PrepError(f"{d}: the merged folder must differ from the folders merged")
    os.makedirs(out_dir, exist_ok=True)
    seen: Dict[str, str] = {}
    counts = {}
    for split in SPLITS:
        rows = []
        for d in inputs:
            path = os.path.join(d, f"{split}.tsv")
            if not os.path.isfile(path):
                if split == "train":
                    raise PrepError(f"{path}: not found (every merged corpus needs train.tsv)")
                continue
            for n, row in read_corpus_tsv_rows(path):
                where = f"{path}:{n}"
                if row["id"] in seen:
                    raise PrepError(f"{where}: duplicate utterance id {row['id']!r} (first at {seen[row['id']]})")
                seen[row["id"]] = where
                audio = row["audio"]
                if not os.path.isabs(audio):
                    audio = os.path.relpath(os.path.abspath(os.path.join(d, audio)), out_abs)
                rows.append(dict(row, audio=audio))
        if rows:
            with atomic_write(os.path.join(out_dir, f"{split}.tsv")) as f:
                f.write(corpus_tsv_text(rows))
            per_lang: Dict[str, int] = defaultdict(int)
            for row in rows:
                per_lang[row["src_lang"]] += 1
            counts[split] = {"utterances": len(rows), "per_lang": dict(sorted(per_lang.items()))}
    for split in SPLITS:  # an earlier merge's split that none of these corpora has
        if split not in counts and os.path.isfile(os.path.join(out_dir, f"{split}.tsv")):
            os.remove(os.path.join(out_dir, f"{split}.tsv"))
    report = {"tool": "gdps-prep-corpus", "source": {"format": "merge", "inputs": [os.path.abspath(d) for d in inputs]},
              "counts": counts}
    with atomic_write(os.path.join(out_dir, REPORT_NAME)) as f:
        f.write(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    if not quiet:
        summary = ", ".join(f"{s} {c['utterances']}" for s, c in counts.items())
        print(f"gdps-prep-corpus merge: {summary} -> {out_dir}", file=sys.stderr)
    return report


def read_delimited(path: str, delimiter: str = "\t", quoting: bool = False) -> Tuple[List[str], List[Tuple[int, List[str]]]]:
    """Header and (line, fields) of a delimited file.  ``quoting``: csv-style quotes (what pandas
    ``to_csv`` writes) are honoured; otherwise a field is everything between delimiters."""
    lines = read_lines(path)
    if not lines:
        raise PrepError(f"{path}: empty file (a header line is required)")
    if not quoting:
        header = [h.strip() for h in lines[0][1].split(delimiter)]
        return header, [(n, t.split(delimiter)) for n, t in lines[1:] if t.strip()]
    text = "\n".join(t for _, t in lines) + "\n"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quotechar='"')
    header: List[str] = []
    rows = []
    for fields in reader:
        n = reader.line_num  # line where the record ends (records may span lines inside quotes)
        if not header:
            header = [h.strip() for h in fields]
            continue
        if fields and any(f.strip() for f in fields):
            rows.append((n, fields))
    return header, rows
