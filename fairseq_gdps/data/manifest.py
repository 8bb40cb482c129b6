"""Corpus TSV reading and fairseq speech-to-text (S2T) data layout writing.

Layout written (same as fairseq's ``examples/speech_to_text/prep_*_data.py``):

* ``fbank80.zip`` -- uncompressed (ZIP_STORED) zip of ``<id>.npy`` (float32,
  frames x 80); manifests point into it as ``fbank80.zip:<byte offset>:<byte length>``
  (offset of the .npy bytes, i.e. past the local file header), which
  ``fairseq.data.audio.audio_utils.get_features_or_waveform`` reads with mmap;
* ``<split>.tsv`` manifests: id, audio, n_frames, tgt_text, speaker, src_text,
  src_lang, tgt_lang -- read by fairseq with ``csv.QUOTE_NONE``, tab delimiter
  and no escape character, so fields must not contain tabs or line breaks;
* ``spm_unigram<N>.{model,vocab,txt}`` and ``config.yaml``.

Every path these files hold is relative to the data folder, except config.yaml's
``audio_root``, which stock fairseq needs absolute; the plugin does not depend on it
(``resolve_audio_root``), so the folder can be moved.

Nothing here imports fairseq or torch.
"""
from __future__ import annotations

import io
import os
import re
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from fairseq_gdps.atomic import atomic_write

REQUIRED_COLUMNS = ("id", "audio", "src_lang", "tgt_text")
OPTIONAL_COLUMNS = ("speaker", "src_text", "duration", "tgt_lang")
MANIFEST_COLUMNS = (
    "id",
    "audio",
    "n_frames",
    "tgt_text",
    "speaker",
    "src_text",
    "src_lang",
    "tgt_lang",
)
ZIP_NAME = "fbank80.zip"
# fairseq's sentencepiece ids (examples/speech_to_text/data_utils.py)
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_PIECES = {"<s>", "<pad>", "</s>", "<unk>"}
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@=,-]*$")
_LANG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
LANG_CODE_HELP = "a language code is a letter or digit followed by letters, digits, '_' or '-'"


def is_language_code(code: str) -> bool:
    """Language codes as the manifests, --gdps-groups and plans use them (no ',', ';' or spaces)."""
    return isinstance(code, str) and _LANG_RE.fullmatch(code) is not None

SPECAUGMENT_POLICIES = {  # fairseq S2TDataConfigWriter policies (its "time_wrap_W" key is a typo the transform ignores)
    "lb": dict(time_warp_W=0, freq_mask_N=1, freq_mask_F=27, time_mask_N=1, time_mask_T=100, time_mask_p=1.0),
    "ld": dict(time_warp_W=0, freq_mask_N=2, freq_mask_F=27, time_mask_N=2, time_mask_T=100, time_mask_p=1.0),
    "sm": dict(time_warp_W=0, freq_mask_N=2, freq_mask_F=15, time_mask_N=2, time_mask_T=70, time_mask_p=0.2),
    "ss": dict(time_warp_W=0, freq_mask_N=2, freq_mask_F=27, time_mask_N=2, time_mask_T=70, time_mask_p=0.2),
}


class PrepError(Exception):
    """Fatal data-preparation error; the message names the file (and line)."""


@dataclass
class BadLine:
    file: str
    line: int  # 1-based line number in ``file``; 0 = whole file
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" if self.line else f"{self.file}: {self.reason}"


@dataclass
class Row:
    split: str
    file: str
    line: int
    id: str
    audio: str  # as written in the TSV
    audio_path: str  # resolved against the corpus folder
    src_lang: str
    tgt_text: str
    tgt_lang: str
    speaker: str = ""
    src_text: str = ""
    duration: Optional[float] = None
    # filled by feature extraction
    zip_ptr: str = ""
    n_frames: int = 0

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _clean(text: str) -> str:
    """Field text safe for fairseq's QUOTE_NONE / tab / newline TSV reader."""
    return re.sub(r"[\t\r\n\v\f\x1c-\x1e\x85\u2028\u2029]", " ", text).strip()


def read_corpus_tsv(
    path: str,
    split: str,
    corpus_dir: str,
    default_tgt_lang: str = "en",
    display_path: Optional[str] = None,
) -> Tuple[List[Row], List[BadLine]]:
    """Parse one corpus TSV (header + tab-separated rows).

    Returns (rows, bad lines).  File-level problems (unreadable, empty, no header,
    missing required columns, non-UTF-8 header) raise PrepError.  Per-line
    problems (wrong field count, non-UTF-8 bytes, empty/invalid id, language or
    target, bad duration) are returned as BadLine so the caller decides whether
    to fail or skip.  Missing audio files are checked here too.
    """
    name = display_path or path
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PrepError(f"{name}: cannot read: {e.strerror or e}") from None
    lines = raw.split(b"\n")
    if raw.startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    if not raw.strip():
        raise PrepError(f"{name}: empty file (a header line with {', '.join(REQUIRED_COLUMNS)} is required)")
    try:
        header = lines[0].rstrip(b"\r").decode("utf-8").split("\t")
    except UnicodeDecodeError as e:
        raise PrepError(f"{name}:1: header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise PrepError(
            f"{name}:1: missing required column(s) {', '.join(missing)} "
            f"(header has: {', '.join(header) or 'nothing'}; needs tab-separated {', '.join(REQUIRED_COLUMNS)})"
        )
    dups = sorted({h for h in header if header.count(h) > 1})
    if dups:
        raise PrepError(f"{name}:1: duplicate column(s) {', '.join(dups)}")
    col = {h: i for i, h in enumerate(header)}
    rows: List[Row] = []
    bad: List[BadLine] = []
    for lineno, bline in enumerate(lines[1:], start=2):
        bline = bline.rstrip(b"\r")
        if not bline.strip():
            continue
        try:
            text = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            field_no = bline[: e.start].count(b"\t")
            column = f" in {header[field_no]}" if field_no < len(header) else ""
            bad.append(BadLine(name, lineno, f"not valid UTF-8{column} ({e.reason} at byte {e.start} of the line)"))
            continue
        fields = text.split("\t")
        if len(fields) != len(header):
            if len(fields) < len(header):  # say which columns went missing (truncated line, spaces for tabs)
                detail = f" (no value for {', '.join(header[len(fields):])}; fields are tab-separated)"
            else:
                detail = " (a tab inside a field?)"
            bad.append(BadLine(name, lineno, f"{len(fields)} fields, header has {len(header)}{detail}"))
            continue

        def get(c: str) -> str:
            return _clean(fields[col[c]]) if c in col else ""

        uid, audio, src_lang, tgt_text = get("id"), get("audio"), get("src_lang"), get("tgt_text")
        tgt_lang = get("tgt_lang") or default_tgt_lang
        if not uid:
            bad.append(BadLine(name, lineno, "empty id"))
            continue
        if not _ID_RE.match(uid):
            bad.append(BadLine(name, lineno, f"invalid id {uid!r} (allowed: letters, digits and ._+@=,- ; no spaces or slashes)"))
            continue
        if not audio:
            bad.append(BadLine(name, lineno, "empty audio path"))
            continue
        if not _LANG_RE.match(src_lang):
            bad.append(BadLine(name, lineno, f"invalid src_lang {src_lang!r} ({LANG_CODE_HELP})" if src_lang
                               else "empty src_lang"))
            continue
        if not _LANG_RE.match(tgt_lang):
            bad.append(BadLine(name, lineno, f"invalid tgt_lang {tgt_lang!r} ({LANG_CODE_HELP})"))
            continue
        if not tgt_text:
            bad.append(BadLine(name, lineno, "empty tgt_text"))
            continue
        duration = None
        dur = get("duration")
        if dur:
            try:
                duration = float(dur)
                if not (duration >= 0 and duration < float("inf")):
                    raise ValueError
            except ValueError:
                bad.append(BadLine(name, lineno, f"invalid duration {dur!r}"))
                continue
        audio_path = os.path.normpath(os.path.join(corpus_dir, audio))
        if not os.path.isfile(audio_path):
            bad.append(BadLine(name, lineno, f"{audio_path}: audio file not found"))
            continue
        rows.append(
            Row(
                split=split,
                file=name,
                line=lineno,
                id=uid,
                audio=audio,
                audio_path=audio_path,
                src_lang=src_lang,
                tgt_text=tgt_text,
                tgt_lang=tgt_lang,
                speaker=get("speaker"),
                src_text=get("src_text"),
                duration=duration,
            )
        )
    return rows, bad


def find_duplicate_ids(rows: Iterable[Row]) -> List[Tuple[Row, BadLine]]:
    """Rows whose id was already used (in any split), with the BadLine to report."""
    seen: Dict[str, Row] = {}
    out = []
    for r in rows:
        if r.id in seen:
            out.append((r, BadLine(r.file, r.line, f"duplicate id {r.id!r} (first at {seen[r.id].where})")))
        else:
            seen[r.id] = r
    return out


# ----------------------------------------------------------------- atomic files


class Staging:
    """Collects output files as temporaries in the output folder and moves them
    into place (``os.replace``) only on :meth:`commit`; :meth:`abort` removes them."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self._tmp: Dict[str, str] = {}  # final name -> temp path

    def path(self, name: str) -> str:
        """A fresh temp path that will become ``out_dir/name`` on commit."""
        if name in self._tmp:
            return self._tmp[name]
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.out_dir)
        os.close(fd)
        self._tmp[name] = tmp
        return tmp

    def write_bytes(self, name: str, data: bytes) -> None:
        with open(self.path(name), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    @property
    def names(self) -> List[str]:
        return sorted(self._tmp)

    def commit(self, last: Sequence[str] = ()) -> None:
        order = [n for n in self._tmp if n not in last] + [n for n in last if n in self._tmp]
        for name in order:
            tmp = self._tmp[name]
            os.chmod(tmp, 0o644)
            os.replace(tmp, os.path.join(self.out_dir, name))
        self._tmp.clear()

    def abort(self) -> None:
        for tmp in self._tmp.values():
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
        self._tmp.clear()


# ----------------------------------------------------------------- feature zip


class FeatureZipWriter:
    """Deterministic ZIP_STORED writer for ``<id>.npy`` entries (add in sorted id
    order; fixed timestamps and attributes)."""

    def __init__(self, path: str):
        self.path = path
        self._zf = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._last: Optional[str] = None

    def add(self, uid: str, npy: bytes) -> None:
        name = f"{uid}.npy"
        if self._last is not None and name <= self._last:
            raise ValueError(f"zip entries must be added in sorted order ({name} after {self._last})")
        self._last = name
        info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
        info.compress_type = zipfile.ZIP_STORED
        info.create_system = 3
        info.external_attr = 0o644 << 16
        self._zf.writestr(info, npy)

    def close(self) -> None:
        self._zf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def zip_entry_offsets(zip_path: str) -> Dict[str, Tuple[int, int]]:
    """{entry stem: (byte offset of the data, byte length)} for a stored zip.

    fairseq's ``get_zip_manifest`` uses ``header_offset + 30 + len(filename)``,
    which assumes an empty local extra field and an ASCII name; here the local
    header is read, so the offset is right in every case."""
    out = {}
    with zipfile.ZipFile(zip_path) as zf, open(zip_path, "rb") as f:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise PrepError(f"{zip_path}: entry {info.filename} is compressed; fairseq needs ZIP_STORED")
            f.seek(info.header_offset)
            hdr = f.read(30)
            sig, name_len, extra_len = hdr[:4], *struct.unpack("<HH", hdr[26:30])
            if sig != b"PK\x03\x04":
                raise PrepError(f"{zip_path}: bad local header for {info.filename}")
            offset = info.header_offset + 30 + name_len + extra_len
            stem = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            out[stem] = (offset, info.file_size)
    return out


# ----------------------------------------------------------------- manifests


def manifest_text(rows: Iterable[Row]) -> str:
    buf = io.StringIO()
    buf.write("\t".join(MANIFEST_COLUMNS) + "\n")
    for r in rows:
        vals = {
            "id": r.id,
            "audio": r.zip_ptr,
            "n_frames": str(r.n_frames),
            "tgt_text": r.tgt_text,
            "speaker": r.speaker,
            "src_text": r.src_text,
            "src_lang": r.src_lang,
            "tgt_lang": r.tgt_lang,
        }
        buf.write("\t".join(_clean(vals[c]) for c in MANIFEST_COLUMNS) + "\n")
    return buf.getvalue()


def skipped_text(bad: Iterable[BadLine]) -> str:
    buf = io.StringIO()
    buf.write("file\tline\treason\n")
    for b in sorted(bad, key=lambda b: (b.file, b.line, b.reason)):
        buf.write(f"{_clean(b.file)}\t{b.line}\t{_clean(b.reason)}\n")
    return buf.getvalue()


def read_manifest(path: str) -> List[Dict[str, str]]:
    """Read a manifest exactly as fairseq's SpeechToTextDatasetCreator does."""
    import csv

    with open(path) as f:
        reader = csv.DictReader(
            f, delimiter="\t", quotechar=None, doublequote=False, lineterminator="\n", quoting=csv.QUOTE_NONE
        )
        return [dict(e) for e in reader]


# ----------------------------------------------------------------- sentencepiece


@dataclass
class SpmResult:
    model: bytes
    vocab_text: str  # sentencepiece's .vocab: "piece<TAB>score"
    dict_text: str  # fairseq dictionary: "piece 1" without the 4 special tokens
    vocab_size: int
    warnings: List[str] = field(default_factory=list)


def train_spm(texts: Sequence[str], vocab_size: int, model_type: str = "unigram") -> SpmResult:
    """Train SentencePiece like fairseq's ``gen_vocab`` (fairseq special ids,
    character_coverage 1.0), in memory so the model carries no temp paths, with
    one thread so it is deterministic.  If the corpus cannot support
    ``vocab_size`` the size is lowered to the largest possible, with a warning."""
    import sentencepiece as spm

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise PrepError("no training targets to build the SentencePiece model from")
    warnings: List[str] = []
    size = vocab_size
    for _ in range(3):
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts),
                model_writer=buf,
                model_type=model_type,
                vocab_size=size,
                character_coverage=1.0,
                num_threads=1,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_id=PAD_ID,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                minloglevel=2,
            )
            break
        except RuntimeError as e:
            msg = str(e)
            m = re.search(r"value <= (\d+)", msg)
            m2 = re.search(r"required_chars\. (\d+) vs (\d+)", msg)
            if m and int(m.group(1)) < size:
                new = int(m.group(1))
                warnings.append(
                    f"vocabulary size {size} is too large for the training targets; using {new}"
                )
                size = new
            elif m2:
                new = int(m2.group(2)) + 4
                warnings.append(
                    f"vocabulary size {size} is smaller than the number of characters; using {new}"
                )
                size = new
            else:
                raise PrepError(f"SentencePiece training failed: {msg}") from None
    else:
        raise PrepError(f"SentencePiece training failed to settle on a vocabulary size (last {size})")
    model = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model)
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    assert [pieces[i][0] for i in (BOS_ID, PAD_ID, EOS_ID, UNK_ID)] == ["<s>", "<pad>", "</s>", "<unk>"]
    vocab_text = "".join(f"{p}\t{s:g}\n" for p, s in pieces)
    dict_text = "".join(f"{p} 1\n" for p, _ in pieces if p not in SPECIAL_PIECES)
    return SpmResult(model, vocab_text, dict_text, len(pieces), warnings)


# ----------------------------------------------------------------- config.yaml


def config_yaml_text(
    spm_model: str,
    vocab_filename: str,
    audio_root: Optional[str] = None,
    specaugment: Optional[str] = None,
    num_mel_bins: int = 80,
) -> str:
    """config.yaml for fairseq's S2TDataConfig.

    ``sentencepiece_model`` is written relative to the data folder (S2TDataConfig
    resolves it against the yaml's folder when it does not exist relative to the
    working directory), ``vocab_filename`` is joined to ``--data`` by the task.
    Manifest audio paths (``fbank80.zip:...``) are joined to ``audio_root``, which
    stock fairseq does *not* resolve against the data folder: the caller passes the
    folder's absolute path so that stock fairseq reads it from any working directory,
    and ``resolve_audio_root`` lets the plugin's task read a moved folder without it.
    Uses ``feature_transforms`` (the deprecated ``transforms`` key that fairseq's
    own prep writes triggers a warning on every load)."""
    import yaml

    cfg = {
        "input_feat_per_channel": num_mel_bins,
        "input_channels": 1,
        "vocab_filename": vocab_filename,
        "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": spm_model},
        "feature_transforms": {"*": ["utterance_cmvn"]},
    }
    if audio_root:
        cfg["audio_root"] = audio_root
    if specaugment and specaugment != "none":
        if specaugment not in SPECAUGMENT_POLICIES:
            raise PrepError(f"unknown specaugment policy {specaugment!r} (choose from {', '.join(SPECAUGMENT_POLICIES)})")
        cfg["specaugment"] = dict(SPECAUGMENT_POLICIES[specaugment])
        cfg["feature_transforms"]["_train"] = ["utterance_cmvn", "specaugment"]
    return yaml.safe_dump(cfg, sort_keys=True, default_flow_style=False, allow_unicode=True)


def iter_languages(rows: Iterable[Row]) -> Iterator[str]:
    return iter(sorted({r.src_lang for r in rows}))


def existing_audio_root(audio_root: str, data_dir: str) -> Optional[str]:
    """``audio_root`` as fairseq resolves the config's other paths: as it stands when that is a
    folder (or empty), else under the data folder; None when it names no folder either way."""
    if not audio_root or os.path.isdir(audio_root):
        return audio_root
    under_data = os.path.join(data_dir, audio_root)
    return under_data if not os.path.isabs(audio_root) and os.path.isdir(under_data) else None


def resolve_audio_root(audio_root: str, data_dir: str) -> str:
    """The folder a data folder's manifest audio paths are read from, given config.yaml's
    ``audio_root`` and the folder that holds config.yaml.

    ``audio_root`` when it names an existing folder (empty: the manifests hold absolute paths,
    or paths relative to the working directory, as in fairseq), a relative one also under the
    data folder, as fairseq resolves the config's other paths; otherwise the data folder itself,
    where ``gdps-prep`` writes the features. So a data folder that was moved or renamed still
    loads, though its config.yaml names the old place."""
    found = existing_audio_root(audio_root, data_dir)
    return data_dir if found is None else found


def relocate_config(data_dir: str) -> Optional[str]:
    """Point ``data_dir/config.yaml``'s ``audio_root`` at the data folder's absolute path when
    it names no existing folder (the data folder was moved): stock fairseq reads the manifests'
    audio through it and has no other way to find a moved folder. Returns the new
    ``audio_root``, or None when nothing changed. Raises PrepError naming the file."""
    import yaml

    path = os.path.join(data_dir, "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise PrepError(f"{path}: cannot read ({e.strerror or e}): not a gdps-prep data folder?") from None
    except yaml.YAMLError as e:
        raise PrepError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise PrepError(f"{path}: not a fairseq data config (a YAML mapping is expected)")
    stored = config.get("audio_root", "")
    if not isinstance(stored, str):
        raise PrepError(f"{path}: audio_root must be a path, got {stored!r}")
    if existing_audio_root(stored, data_dir) is not None:
        return None
    config["audio_root"] = os.path.abspath(data_dir)
    mode = os.stat(path).st_mode & 0o777
    with atomic_write(path) as f:
        yaml.safe_dump(config, f, sort_keys=True, default_flow_style=False, allow_unicode=True)
    os.chmod(path, mode)
    return config["audio_root"]
