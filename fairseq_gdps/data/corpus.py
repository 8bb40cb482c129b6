"""Deterministic generator of a small multilingual speech-translation corpus.

Speech in Arabic (ar), Estonian (et), Irish (ga) and Swahili (sw) is
synthesised with espeak-ng from CLDR-derived sentences (see
:mod:`fairseq_gdps.data.cldr_text`); the target is the English sentence with the
same meaning, numbers spelled out in words on both sides.

Output layout (``OUT``)::

    OUT/wav/<lang>/<id>.wav        16 kHz mono 16-bit PCM
    OUT/{train,dev,test}.tsv       id audio duration speaker src_lang src_text tgt_text
    OUT/corpus.json                settings, seed, counts, speakers, conflict maps, version

The same configuration and seed give byte-identical TSVs and wavs: every random
choice comes from a seeded numpy generator keyed by purpose and language, and
each chunk of utterances is synthesised in a fresh worker process (espeak-ng
keeps a little state between utterances) whose chunking does not depend on the
number of jobs.

A *conflict language* ``NAME:BASE`` sounds like BASE (same espeak-ng voice
language) but means something else: number words and/or unit words are
permuted by a fixed derangement (stored in ``corpus.json``), and the English
target follows the remapped meaning. Its speakers are its own
(``conflict_speakers="own"``, the default: other voice variants, rates and
pitches than BASE's, so NAME differs from BASE by voice as well as by meaning)
or BASE's very speakers (``"shared"``: the same Speaker objects, so the
speaker column shows BASE's speaker ids and NAME's audio comes from the same
voices, rates, pitches, word gaps and gains as BASE's; only the meaning of the
words differs). Either way NAME has its own sentences (sampled with its own
seed) and its own split into train/dev/test.

The synthesis itself (espeak-ng, post-processing, Arabic vowel marks) is in
:mod:`fairseq_gdps.data.speech_synthesis`. Pure Python + numpy/scipy; no fairseq import.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import zlib
from collections import Counter, defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from fairseq_gdps.data import cldr_text as ct
from fairseq_gdps.data.cldr_text import LANGUAGES, Phrase
from fairseq_gdps.data.speech_synthesis import (  # noqa: F401  (diacritise, write_wav: public here too)
    SAMPLE_RATE, SynthesisUnavailable, _synth_chunk, diacritise, espeak_version, resolve_backend, write_wav,
)
from fairseq_gdps.atomic import atomic_write
from fairseq_gdps.process_pool import pool_context

VERSION = 1
SPLITS = ("train", "dev", "test")
TSV_COLUMNS = ("id", "audio", "duration", "speaker", "src_lang", "src_text", "tgt_text")
CHUNK_SIZE = 48  # utterances per fresh synthesis process (fixed: part of determinism)

QUICK_UNITS = ("kilogram", "gram", "meter", "kilometer", "liter", "centimeter")
QUICK_REL_UNITS = ("day",)
FULL_REL_UNITS = ("day", "week", "month", "year")

#: espeak-ng voice variants used for speakers (robotic, whispering, echoing and
#: joke variants left out, and near-duplicates: edward2 = edward, adam ~ caleb ~
#: klatt, klatt6 ~ klatt5).  The order is fixed; the seed shuffles it.
VOICE_VARIANTS = (
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Denis", "Diogo", "Gene", "Gene2",
    "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen",
    "RicishayMax", "RicishayMax2", "RicishayMax3", "Storm", "Tweaky", "anika", "antonio",
    "aunty", "belinda", "benjamin", "boris", "croak", "david", "ed", "edward",
    "f1", "f2", "f3", "f4", "f5", "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4",
    "john", "kaukovalta", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "linda",
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "marcelo", "max", "michel", "miguel",
    "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro", "shelby", "steph",
    "steph2", "steph3", "travis", "victor", "zac",
)

PROFILES: Dict[str, dict] = {
    # Narrow domain a ~2M-parameter model learns in minutes on CPU.
    "quick": dict(
        utterances_per_language=2000, max_number=20, min_phrases=1, max_phrases=2,
        min_target_words=3, families=("unit", "rel"), units=QUICK_UNITS,
        rel_units=QUICK_REL_UNITS, speakers_per_language=2,
    ),
    # Same domain, more data and speakers.
    "full": dict(
        utterances_per_language=6000, max_number=30, min_phrases=1, max_phrases=2,
        min_target_words=4, families=("unit", "rel"), units=QUICK_UNITS,
        rel_units=FULL_REL_UNITS, speakers_per_language=6,
    ),
    # Wide domain for benchmarks: many units, 1-100, money, names.
    "hard": dict(
        utterances_per_language=3000, max_number=100, min_phrases=1, max_phrases=3,
        min_target_words=4, families=ct.FAMILIES, units=tuple(ct.UNIT_CATALOG),
        rel_units=ct.REL_UNITS, speakers_per_language=8,
    ),
}
COMMON_DEFAULTS = dict(
    seed=1, languages=LANGUAGES, conflict=(), conflict_remap="both", conflict_speakers="own", heldout_test_speakers=0,
    dev_fraction=0.1, test_fraction=0.1, snr_db=None, jobs=2, tts_backend="auto",
)


#: --conflict-speakers: a conflict language's own speakers, or exactly its base language's
CONFLICT_SPEAKERS = ("own", "shared")


class CorpusError(ValueError):
    """A bad setting (message names the offending value)."""


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    profile: str
    seed: int
    languages: Tuple[str, ...]
    conflict: Tuple[Tuple[str, str], ...]
    conflict_remap: str
    conflict_speakers: str
    utterances_per_language: int
    max_number: int
    min_phrases: int
    max_phrases: int
    min_target_words: int
    families: Tuple[str, ...]
    units: Tuple[str, ...]
    rel_units: Tuple[str, ...]
    speakers_per_language: int
    heldout_test_speakers: int
    dev_fraction: float
    test_fraction: float
    snr_db: Optional[float]
    jobs: int
    tts_backend: str

    @property
    def all_languages(self) -> Tuple[str, ...]:
        """Source languages incl. conflict languages, in output order."""
        return tuple(self.languages) + tuple(name for name, _ in self.conflict)

    def base_of(self, lang: str) -> str:
        return dict(self.conflict).get(lang, lang)

    def speakers_of(self, lang: str) -> str:
        """The language whose speakers ``lang`` uses: itself, or its base language for a
        conflict language with ``conflict_speakers="shared"``."""
        return self.base_of(lang) if self.conflict_speakers == "shared" else lang

    @property
    def voiced_languages(self) -> Tuple[str, ...]:
        """Languages with speakers of their own (each needs its own voice variants)."""
        return tuple(lang for lang in self.all_languages if self.speakers_of(lang) == lang)

    def to_json(self) -> dict:
        """Settings that shape the output (not --jobs, which does not)."""
        d = dataclasses.asdict(self)
        del d["jobs"]
        d["conflict"] = [f"{n}:{b}" for n, b in self.conflict]
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


# --------------------------------------------------------------------------- config
def _split_list(value, what: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    else:
        items = [str(v).strip() for v in value]
    items = [v for v in items if v]
    if not items:
        raise CorpusError(f"{what} is empty")
    dup = [v for v, c in Counter(items).items() if c > 1]
    if dup:
        raise CorpusError(f"duplicate value {dup[0]!r} in {what}")
    return tuple(items)


def _parse_conflict(value) -> Tuple[Tuple[str, str], ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    out = []
    for spec in value:
        if isinstance(spec, (tuple, list)):
            name, base = spec
        else:
            name, sep, base = str(spec).partition(":")
            if not sep:
                raise CorpusError(f"bad --conflict-language {spec!r}: expected NAME:BASE, e.g. xx:et")
        name, base = name.strip(), base.strip()
        if not re.fullmatch(r"[a-z][a-z0-9]{1,7}", name):
            raise CorpusError(f"bad conflict language name {name!r}: use 2-8 lower-case letters/digits, e.g. xx")
        if base not in LANGUAGES:
            raise CorpusError(f"unknown base language {base!r} in --conflict-language {name}:{base} "
                              f"(choose from {', '.join(LANGUAGES)})")
        out.append((name, base))
    return tuple(out)


def make_config(profile: str = "quick", **overrides) -> CorpusConfig:
    """Profile defaults, then ``overrides`` (``None`` values are ignored), validated."""
    if profile not in PROFILES:
        raise CorpusError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    unknown = set(overrides) - set(f.name for f in dataclasses.fields(CorpusConfig))
    if unknown:
        raise CorpusError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    s = dict(COMMON_DEFAULTS)
    s.update(PROFILES[profile])
    s.update({k: v for k, v in overrides.items() if v is not None})
    s["profile"] = profile

    langs = _split_list(s["languages"], "--languages")
    for lang in langs:
        if lang not in LANGUAGES:
            raise CorpusError(f"unknown language {lang!r} in --languages (choose from {', '.join(LANGUAGES)})")
    s["languages"] = tuple(l for l in LANGUAGES if l in langs)  # canonical order
    s["conflict"] = _parse_conflict(s["conflict"])
    names = [n for n, _ in s["conflict"]]
    for n in names:
        if n in LANGUAGES or n == "en":
            raise CorpusError(f"conflict language name {n!r} clashes with a real language code")
    if len(set(names)) != len(names):
        raise CorpusError("duplicate conflict language name")
    if s["conflict_remap"] not in ("numbers", "units", "both"):
        raise CorpusError(f"bad --conflict-remap {s['conflict_remap']!r} (numbers, units or both)")
    if s["conflict_speakers"] not in CONFLICT_SPEAKERS:
        raise CorpusError(f"bad --conflict-speakers {s['conflict_speakers']!r} (choose from "
                          f"{', '.join(CONFLICT_SPEAKERS)}: a conflict language's own speakers, or its base "
                          f"language's)")

    s["families"] = _split_list(s["families"], "--families")
    for f in s["families"]:
        if f not in ct.FAMILIES:
            raise CorpusError(f"unknown phrase family {f!r} in --families (choose from {', '.join(ct.FAMILIES)})")
    s["units"] = _split_list(s["units"], "--units")
    for u in s["units"]:
        if u not in ct.UNIT_CATALOG:
            raise CorpusError(f"unknown unit {u!r} in --units (choose from {', '.join(ct.UNIT_CATALOG)})")
    s["rel_units"] = _split_list(s["rel_units"], "--time-units")
    for u in s["rel_units"]:
        if u not in ct.REL_UNITS:
            raise CorpusError(f"unknown time unit {u!r} in --time-units (choose from {', '.join(ct.REL_UNITS)})")

    def _int(name, lo, hi=None):
        v = s[name]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise CorpusError(f"--{name.replace('_', '-')} must be an integer {rng}, got {v!r}")
        s[name] = int(v)

    _int("seed", 0, 2**63 - 1)
    _int("utterances_per_language", 1)
    _int("max_number", 1, 1000)
    _int("min_phrases", 1, 6)
    _int("max_phrases", 1, 6)
    _int("min_target_words", 0)
    _int("speakers_per_language", 1)
    _int("heldout_test_speakers", 0)
    _int("jobs", 1, 256)
    if s["min_phrases"] > s["max_phrases"]:
        raise CorpusError(f"--min-phrases {s['min_phrases']} exceeds --max-phrases {s['max_phrases']}")
    for name in ("dev_fraction", "test_fraction"):
        v = float(s[name])
        if not 0.0 <= v < 1.0:
            raise CorpusError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
        s[name] = v
    if s["dev_fraction"] + s["test_fraction"] >= 1.0:
        raise CorpusError("--dev-fraction + --test-fraction must leave something for train")
    if s["snr_db"] is not None:
        s["snr_db"] = float(s["snr_db"])
        if not math.isfinite(s["snr_db"]):
            raise CorpusError("--snr-db must be finite")
    if s["tts_backend"] not in ("auto", "lib", "cli"):
        raise CorpusError(f"bad --tts-backend {s['tts_backend']!r} (auto, lib or cli)")
    # conflict languages sharing their base language's speakers need no voice variants of their own
    n_langs = len(s["languages"]) + (len(s["conflict"]) if s["conflict_speakers"] == "own" else 0)
    need = n_langs * (s["speakers_per_language"] + s["heldout_test_speakers"])
    if need > len(VOICE_VARIANTS):
        raise CorpusError(f"{need} speakers requested but only {len(VOICE_VARIANTS)} espeak-ng voice variants "
                          f"exist (each speaker needs its own); lower --speakers-per-language/--heldout-test-speakers"
                          + (" or use --conflict-speakers shared" if s["conflict"] and s["conflict_speakers"] == "own"
                             else ""))
    cfg = CorpusConfig(**s)
    if cfg.conflict:
        can_numbers = cfg.conflict_remap in ("numbers", "both") and cfg.max_number >= 2
        can_keys = cfg.conflict_remap in ("units", "both") and any(
            len(k) >= 2 for k in ct.all_keys(cfg.families, cfg.units, cfg.rel_units).values())
        if not (can_numbers or can_keys):
            raise CorpusError(f"--conflict-remap {cfg.conflict_remap} changes nothing here (needs --max-number >= 2 "
                              "for numbers, or two or more units/time units for units)")
    bad = ct.bad_units(cfg.units, cfg.languages) if "unit" in cfg.families else {}
    if bad:
        u, forms = next(iter(bad.items()))
        raise CorpusError(f"unit {u!r} has abbreviated CLDR forms: {forms[:3]}")
    return cfg


# --------------------------------------------------------------------------- randomness
def _rng(seed: int, *keys) -> np.random.Generator:
    """A generator for one purpose; keys are strings or ints (stable across runs)."""
    ints = [seed & 0xFFFFFFFF, seed >> 32]
    for k in keys:
        ints.append(zlib.crc32(k.encode("utf-8")) if isinstance(k, str) else int(k))
    return np.random.default_rng(ints)


def _derangement(items: Sequence, rng: np.random.Generator) -> Dict:
    """A permutation without fixed points (identity if fewer than 2 items)."""
    items = list(items)
    if len(items) < 2:
        return {x: x for x in items}
    order = [items[i] for i in rng.permutation(len(items))]
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}


# --------------------------------------------------------------------------- speakers
@dataclasses.dataclass(frozen=True)
class Speaker:
    id: str
    lang: str
    voice: str  # espeak-ng voice language
    variant: str
    rate: int
    pitch: int
    wordgap: int
    gain: float
    heldout: bool

    @property
    def espeak_voice(self) -> str:
        return f"{self.voice}+{self.variant}"


def assign_speakers(cfg: CorpusConfig) -> Dict[str, List[Speaker]]:
    """Speakers per language (regular ones, then held-out test speakers). A conflict language
    with ``conflict_speakers="shared"`` gets its base language's list itself (the same Speaker
    objects); it draws nothing from the generator, so every other language's speakers are
    those of the same corpus without it."""
    rng = _rng(cfg.seed, "speakers")
    variants = [VOICE_VARIANTS[i] for i in rng.permutation(len(VOICE_VARIANTS))]
    out: Dict[str, List[Speaker]] = {}
    pos = 0
    for lang in cfg.voiced_languages:
        spk = []
        for k in range(cfg.speakers_per_language + cfg.heldout_test_speakers):
            held = k >= cfg.speakers_per_language
            sid = f"{lang}_h{k - cfg.speakers_per_language + 1:02d}" if held else f"{lang}_s{k + 1:02d}"
            spk.append(Speaker(
                id=sid, lang=lang, voice=cfg.base_of(lang), variant=variants[pos],
                rate=int(rng.integers(150, 201)), pitch=int(rng.integers(25, 76)),
                wordgap=int(rng.choice([0, 0, 0, 1, 2])), gain=round(float(rng.uniform(0.3, 0.8)), 3),
                heldout=held,
            ))
            pos += 1
        out[lang] = spk
    for lang in cfg.all_languages:
        if lang not in out:
            out[lang] = out[cfg.speakers_of(lang)]
    return out


# --------------------------------------------------------------------------- text
class _Sampler:
    def __init__(self, cfg: CorpusConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        self.keys = ct.all_keys(cfg.families, cfg.units, cfg.rel_units)

    def phrase(self) -> Phrase:
        rng, cfg = self.rng, self.cfg
        fam = cfg.families[int(rng.integers(len(cfg.families)))]
        n = int(rng.integers(1, cfg.max_number + 1))
        if fam == "unit":
            return Phrase("unit", cfg.units[int(rng.integers(len(cfg.units)))], n)
        if fam == "rel":
            unit = cfg.rel_units[int(rng.integers(len(cfg.rel_units)))]
            return Phrase("rel", unit, n, ct.REL_DIRECTIONS[int(rng.integers(2))])
        if fam == "money":
            return Phrase("money", ct.CURRENCIES[int(rng.integers(len(ct.CURRENCIES)))], n)
        kinds = sorted(ct.NAME_KINDS)
        kind = kinds[int(rng.integers(len(kinds)))]
        items = ct.NAME_KINDS[kind]
        return Phrase("name", f"{kind}:{items[int(rng.integers(len(items)))]}")

    def sentence(self) -> Tuple[Phrase, ...]:
        cfg = self.cfg
        k = int(self.rng.integers(cfg.min_phrases, cfg.max_phrases + 1))
        phrases: List[Phrase] = []

        def add():
            for _ in range(20):  # no two phrases with the same key in one sentence
                p = self.phrase()
                if all((p.family, p.key) != (q.family, q.key) for q in phrases):
                    break
            phrases.append(p)

        while len(phrases) < k:
            add()
        while len(phrases) < cfg.max_phrases and ct.english_words(phrases) < cfg.min_target_words:
            add()
        return tuple(phrases)


def conflict_maps(cfg: CorpusConfig, name: str) -> dict:
    """Number map (meaning -> spoken number) and key maps per permutation group."""
    rng = _rng(cfg.seed, "conflict", name)
    numbers = list(range(1, cfg.max_number + 1))
    nmap = _derangement(numbers, rng) if cfg.conflict_remap in ("numbers", "both") else {n: n for n in numbers}
    kmaps = {}
    for group, keys in ct.all_keys(cfg.families, cfg.units, cfg.rel_units).items():
        kmaps[group] = _derangement(keys, rng) if cfg.conflict_remap in ("units", "both") else {k: k for k in keys}
    return {"numbers": nmap, "keys": kmaps}


def remap(phrases: Sequence[Phrase], maps: dict) -> Tuple[Phrase, ...]:
    out = []
    for p in phrases:
        key = maps["keys"].get(ct.group_of(p), {}).get(p.key, p.key)
        n = maps["numbers"].get(p.n, p.n) if p.family != "name" else p.n
        out.append(Phrase(p.family, key, n, p.aux))
    return tuple(out)


# --------------------------------------------------------------------------- splits
def _split_groups(items: Sequence[Tuple[str, str]], cfg: CorpusConfig, rng: np.random.Generator) -> List[str]:
    """Split label per utterance; utterances sharing a source text or a target
    (i.e. the same sentence) always land in the same split."""
    parent = list(range(len(items)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: Dict[Tuple[str, str], int] = {}
    for i, (src, tgt) in enumerate(items):
        for key in (("s", src), ("t", tgt)):
            if key in first:
                a, b = find(i), find(first[key])
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[key] = i
    groups: Dict[int, List[int]] = defaultdict(list)
    for i in range(len(items)):
        groups[find(i)].append(i)
    roots = sorted(groups)
    order = [roots[i] for i in rng.permutation(len(roots))]
    n = len(items)
    want = {
        "test": max(1, round(cfg.test_fraction * n)) if cfg.test_fraction > 0 else 0,
        "dev": max(1, round(cfg.dev_fraction * n)) if cfg.dev_fraction > 0 else 0,
    }
    labels = [""] * n
    pos = 0
    for split in ("test", "dev"):
        got = 0
        # leave at least one group for train
        while got < want[split] and pos < len(order) - 1:
            for i in groups[order[pos]]:
                labels[i] = split
            got += len(groups[order[pos]])
            pos += 1
    for r in order[pos:]:
        for i in groups[r]:
            labels[i] = "train"
    return labels


# --------------------------------------------------------------------------- main entry
@dataclasses.dataclass
class Utterance:
    id: str
    lang: str
    index: int
    meaning: Tuple[Phrase, ...]
    src_text: str
    tgt_text: str
    speech_text: str = ""
    split: str = ""
    speaker: Optional[Speaker] = None
    rate: int = 0
    pitch: int = 0
    duration: float = 0.0
    rms: float = 0.0

    @property
    def audio(self) -> str:
        return f"wav/{self.lang}/{self.id}.wav"


def build_text(cfg: CorpusConfig) -> Tuple[List[Utterance], dict]:
    """Sample sentences, render source/target text, assign splits (no audio)."""
    utts: List[Utterance] = []
    cmaps = {name: conflict_maps(cfg, name) for name, _ in cfg.conflict}
    en = ct.renderer("en")
    for lang in cfg.all_languages:
        base = cfg.base_of(lang)
        src_r = ct.renderer(base)
        sampler = _Sampler(cfg, _rng(cfg.seed, "text", lang))
        for i in range(cfg.utterances_per_language):
            meaning = sampler.sentence()
            spoken = remap(meaning, cmaps[lang]) if lang in cmaps else meaning
            src = ct.clean_text(src_r.sentence(spoken))
            tgt = ct.normalise_target(en.sentence(meaning))
            utts.append(Utterance(f"{lang}_{i + 1:06d}", lang, i, meaning, src, tgt))
    # Arabic vowel marks, one mishkal call per distinct phrase.
    ar_phrases = {}
    for u in utts:
        if cfg.base_of(u.lang) == "ar":
            spoken = remap(u.meaning, cmaps[u.lang]) if u.lang in cmaps else u.meaning
            ar_phrases[u.id] = [ct.clean_text(ct.renderer("ar").phrase(p)) for p in spoken]
    t0 = time.time()
    marks = diacritise([p for ps in ar_phrases.values() for p in ps], cfg.jobs)
    fallbacks = sum(1 for k, v in marks.items() if not re.search("[\u064b-\u0652]", v))
    info = {"arabic_phrases": len(marks), "arabic_undiacritised": fallbacks,
            "arabic_seconds": round(time.time() - t0, 2)}
    for u in utts:
        if u.id in ar_phrases:
            u.speech_text = ct.renderer("ar").join([marks[p] for p in ar_phrases[u.id]], conj_prefix="وَ")
        else:
            u.speech_text = u.src_text
    # splits, per language
    by_lang: Dict[str, List[Utterance]] = defaultdict(list)
    for u in utts:
        by_lang[u.lang].append(u)
    speakers = assign_speakers(cfg)
    for lang, us in by_lang.items():
        labels = _split_groups([(u.src_text, u.tgt_text) for u in us], cfg, _rng(cfg.seed, "split", lang))
        rng = _rng(cfg.seed, "speaker-choice", lang)
        regular = [s for s in speakers[lang] if not s.heldout]
        held = [s for s in speakers[lang] if s.heldout]
        for u, lab in zip(us, labels):
            u.split = lab
            pool = held if (lab == "test" and held) else regular
            u.speaker = pool[int(rng.integers(len(pool)))]
            u.rate = int(np.clip(u.speaker.rate + int(rng.integers(-8, 9)), 80, 450))
            u.pitch = int(np.clip(u.speaker.pitch + int(rng.integers(-5, 6)), 0, 99))
    info["speakers"] = speakers
    info["conflict_maps"] = cmaps
    return utts, info


def _check_out_dir(out: str, force: bool) -> None:
    ours = ["wav", "corpus.json"] + [f"{s}.tsv" for s in SPLITS]
    present = [p for p in ours if os.path.exists(os.path.join(out, p))]
    if present and not force:
        raise CorpusError(f"{out} already holds a corpus ({', '.join(present)}); use --force to replace it")
    for p in present:
        full = os.path.join(out, p)
        if os.path.isdir(full):
            shutil.rmtree(full)
        else:
            os.remove(full)


def _atomic_write(path: str, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def _tsv(utts: Iterable[Utterance]) -> str:
    lines = ["\t".join(TSV_COLUMNS)]
    for u in utts:
        row = (u.id, u.audio, f"{u.duration:.3f}", u.speaker.id, u.lang, u.src_text, u.tgt_text)
        for v in row:
            if "\t" in v or "\n" in v or "\r" in v:
                raise AssertionError(f"tab/newline in TSV field {v!r}")
        lines.append("\t".join(row))
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("babel", "unicode-rbnf", "num2words", "mishkal", "numpy", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["espeak-ng"] = espeak_version()
    return out


def generate(cfg: CorpusConfig, out: str, progress: bool = True, force: bool = False) -> dict:
    """Write the corpus under ``out``; return the summary (also stored in corpus.json)."""
    t_start = time.time()
    try:
        backend = resolve_backend(cfg.tts_backend)
    except SynthesisUnavailable as e:
        raise CorpusError(str(e)) from None
    os.makedirs(out, exist_ok=True)
    _check_out_dir(out, force)
    utts, info = build_text(cfg)
    for lang in cfg.all_languages:
        os.makedirs(os.path.join(out, "wav", lang), exist_ok=True)

    # Chunks never span languages, and their size does not depend on --jobs.
    tasks = []
    by_lang: Dict[str, List[Utterance]] = defaultdict(list)
    for u in utts:
        by_lang[u.lang].append(u)
    for lang in cfg.all_languages:
        us = by_lang[lang]
        for i in range(0, len(us), CHUNK_SIZE):
            items = [(u.audio, u.speaker.espeak_voice, u.rate, u.pitch, u.speaker.wordgap, u.speaker.gain,
                      u.speech_text, [cfg.seed & 0xFFFFFFFF, cfg.seed >> 32, zlib.crc32(u.lang.encode()), u.index])
                     for u in us[i:i + CHUNK_SIZE]]
            tasks.append((us[i:i + CHUNK_SIZE], (backend, out, cfg.snr_db, items)))

    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread in this process

    t_synth = time.time()
    bar = tqdm(total=len(utts), desc="synthesising", unit="utt", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    # a fresh worker per chunk (espeak-ng keeps state between utterances), forked by a fork server
    # that has imported the synthesis module once
    ctx = pool_context()
    with ctx.Pool(min(cfg.jobs, max(1, len(tasks))), maxtasksperchild=1) as pool:
        for (us, _), res in zip(tasks, pool.imap(_synth_chunk, [t for _, t in tasks])):
            for u, (n, rms) in zip(us, res):
                u.duration = n / SAMPLE_RATE
                u.rms = rms
            bar.update(len(us))
    bar.close()
    synth_seconds = time.time() - t_synth

    # TSVs (atomic), sorted by language order then id.
    lang_pos = {l: i for i, l in enumerate(cfg.all_languages)}
    counts = {lang: {s: 0 for s in SPLITS} for lang in cfg.all_languages}
    for u in utts:
        counts[u.lang][u.split] += 1
    for split in SPLITS:
        rows = sorted((u for u in utts if u.split == split), key=lambda u: (lang_pos[u.lang], u.index))
        _atomic_write(os.path.join(out, f"{split}.tsv"), _tsv(rows))

    train_tgts = {u.tgt_text for u in utts if u.split == "train"}
    test = [u for u in utts if u.split == "test"]
    vocab = {w for u in utts for w in u.tgt_text.split()}
    elapsed = time.time() - t_start
    summary = {
        "utterances": len(utts),
        "counts": counts,
        "split_totals": {s: sum(c[s] for c in counts.values()) for s in SPLITS},
        "mean_duration": round(float(np.mean([u.duration for u in utts])), 3),
        "total_hours": round(sum(u.duration for u in utts) / 3600.0, 3),
        "min_rms": round(min(u.rms for u in utts), 4),
        "test_unseen_share": round(sum(u.tgt_text not in train_tgts for u in test) / len(test), 4) if test else None,
        "english_vocab_size": len(vocab),
        "mean_target_words": round(float(np.mean([len(u.tgt_text.split()) for u in utts])), 2),
        "min_target_words": min(len(u.tgt_text.split()) for u in utts),
        "distinct_sentences": len({(u.lang, u.tgt_text) for u in utts}),
        "arabic_phrases": info["arabic_phrases"],
        "arabic_undiacritised": info["arabic_undiacritised"],
        "seconds": round(elapsed, 2),
        "synthesis_seconds": round(synth_seconds, 2),
        "utterances_per_second": round(len(utts) / elapsed, 1),
    }
    speakers = info["speakers"]
    meta = {
        "generator": "fairseq_gdps.data.corpus",
        "version": VERSION,
        "seed": cfg.seed,
        "settings": cfg.to_json(),
        "sample_rate": SAMPLE_RATE,
        "tts_backend": backend,
        "tsv_columns": list(TSV_COLUMNS),
        "languages": {lang: {"espeak_voice": cfg.base_of(lang), "conflict_base": dict(cfg.conflict).get(lang),
                             "speakers_of": cfg.speakers_of(lang)}
                      for lang in cfg.all_languages},
        # one entry per speaker; a speaker shared by a conflict language keeps its base language's
        # "lang" (the languages it speaks: "languages")
        "speakers": {s.id: {**{k: v for k, v in dataclasses.asdict(s).items() if k != "id"},
                            "languages": [l for l in cfg.all_languages if s in speakers[l]]}
                     for lang in cfg.all_languages for s in speakers[lang]},
        "conflict": {
            name: {
                "base": base,
                "remap": cfg.conflict_remap,
                "speakers": cfg.conflict_speakers,
                "number_map": {str(k): v for k, v in info["conflict_maps"][name]["numbers"].items()},
                "key_maps": info["conflict_maps"][name]["keys"],
                "meaning": "the speech says number_map[n] / key_maps[group][k] where the English says n / k",
            }
            for name, base in cfg.conflict
        },
        "summary": {k: v for k, v in summary.items() if k not in ("seconds", "synthesis_seconds",
                                                                  "utterances_per_second", "arabic_seconds")},
        "versions": _versions(),
    }
    _atomic_write(os.path.join(out, "corpus.json"), json.dumps(meta, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    return summary


def format_summary(summary: dict, out: str) -> str:
    lines = [f"corpus written to {out}"]
    langs = list(summary["counts"])
    lines.append("  lang    " + "".join(f"{s:>8}" for s in SPLITS))
    for lang in langs:
        lines.append(f"  {lang:<8}" + "".join(f"{summary['counts'][lang][s]:>8}" for s in SPLITS))
    lines.append("  total   " + "".join(f"{summary['split_totals'][s]:>8}" for s in SPLITS))
    unseen = summary["test_unseen_share"]
    lines += [
        f"  utterances: {summary['utterances']}  ({summary['total_hours']:.2f} h of audio, "
        f"mean duration {summary['mean_duration']:.2f} s)",
        f"  distinct sentences: {summary['distinct_sentences']}; target words: mean "
        f"{summary['mean_target_words']}, min {summary['min_target_words']}",
        "  test sentences unseen in train (any language): "
        + (f"{100 * unseen:.1f}%" if unseen is not None else "n/a (no test split)"),
        f"  English vocabulary: {summary['english_vocab_size']} words",
        f"  Arabic phrases diacritised: {summary['arabic_phrases']} "
        f"({summary['arabic_undiacritised']} left without vowel marks)",
        f"  time: {summary['seconds']:.1f} s ({summary['synthesis_seconds']:.1f} s synthesis), "
        f"{summary['utterances_per_second']:.1f} utterances/s",
    ]
    return "\n".join(lines)
