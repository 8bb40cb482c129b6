"""Tests for the demo corpus generator (gdps-make-corpus).  Tiny sizes: a few seconds."""
import json
import os
import shutil
import wave

import numpy as np
import pytest

from fairseq_gdps.cli import make_corpus
from fairseq_gdps.data import cldr_text as ct
from fairseq_gdps.data import corpus as C
from fairseq_gdps.data.cldr_text import Phrase

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

TINY = dict(utterances_per_language=12, speakers_per_language=2)
HEADER = ["id", "audio", "duration", "speaker", "src_lang", "src_text", "tgt_text"]


def _gen(out, profile="quick", **kw):
    cfg = C.make_config(profile, **{**TINY, **kw})
    C.generate(cfg, str(out), progress=False)
    return cfg


def _rows(out):
    rows = []
    for split in C.SPLITS:
        with open(os.path.join(out, f"{split}.tsv"), encoding="utf-8", newline="") as f:
            lines = f.read().split("\n")
        assert lines[-1] == "" and lines[0].split("\t") == HEADER
        for line in lines[1:-1]:
            fields = line.split("\t")
            assert len(fields) == 7, line
            rows.append(dict(zip(HEADER, fields), split=split))
    return rows


def _read_wav(path):
    with wave.open(path, "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64) / 32768.0


def _files(out):
    found = {}
    for root, _, names in os.walk(out):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                found[os.path.relpath(p, out)] = f.read()
    return found


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """All four languages through the CLI, seed 3, two jobs."""
    out = tmp_path_factory.mktemp("base")
    rc = make_corpus.main(["--out", str(out), "--seed", "3", "--utterances-per-language", "12",
                           "--speakers-per-language", "2", "--jobs", "2", "--no-progress"])
    assert rc == 0
    return out


def test_same_seed_byte_identical_and_independent_of_jobs(base, tmp_path):
    _gen(tmp_path / "again", seed=3, jobs=1)
    a, b = _files(base), _files(tmp_path / "again")
    assert sorted(a) == sorted(b)
    assert len([p for p in a if p.endswith(".wav")]) == 48
    for p in a:
        assert a[p] == b[p], p


def test_different_seed_differs(base, tmp_path):
    _gen(tmp_path / "other", seed=4)
    a, b = _files(base), _files(tmp_path / "other")
    assert a["train.tsv"] != b["train.tsv"]
    common = [p for p in a if p.endswith(".wav") and p in b]
    assert common and sum(a[p] != b[p] for p in common) >= len(common) - 1


def test_tsv_columns_paths_and_durations(base):
    rows = _rows(base)
    assert len(rows) == 48
    assert {r["src_lang"] for r in rows} == set(ct.LANGUAGES)
    for r in rows:
        assert r["audio"] == f"wav/{r['src_lang']}/{r['id']}.wav"
        x = _read_wav(os.path.join(base, r["audio"]))
        assert r["duration"] == f"{len(x) / 16000:.3f}"
        assert r["speaker"].startswith(r["src_lang"] + "_s")
        assert r["src_text"].strip() and "  " not in r["src_text"]
        assert r["tgt_text"] == ct.normalise_target(r["tgt_text"])
        assert len(r["tgt_text"].split()) >= 3  # quick profile: at least three English words
    meta = json.load(open(os.path.join(base, "corpus.json"), encoding="utf-8"))
    assert meta["version"] == C.VERSION and meta["seed"] == 3
    assert meta["settings"]["utterances_per_language"] == 12
    assert sum(meta["summary"]["counts"]["ar"].values()) == 12
    assert not [n for n in os.listdir(base) if ".tmp" in n]


def test_splits_never_share_a_sentence(base):
    rows = _rows(base)
    for field in ("src_text", "tgt_text"):
        seen = {}
        for r in rows:
            key = (r["src_lang"], r[field])
            assert seen.setdefault(key, r["split"]) == r["split"], key
    for lang in ct.LANGUAGES:
        assert {r["split"] for r in rows if r["src_lang"] == lang} == set(C.SPLITS)


def test_all_languages_audible(base):
    rows = _rows(base)
    for lang in ct.LANGUAGES:
        for r in [r for r in rows if r["src_lang"] == lang]:
            x = _read_wav(os.path.join(base, r["audio"]))
            assert 0.3 <= len(x) / 16000 <= 15.0, r
            assert np.sqrt(np.mean(x ** 2)) > 0.02, r
            frames = x[: len(x) // 320 * 320].reshape(-1, 320)
            voiced = np.mean(np.sqrt(np.mean(frames ** 2, axis=1)) > 0.01)
            assert voiced > 0.4, (r, voiced)
            assert np.all(x[:800] == 0)  # clean corpus: the 0.1 s padding is silent


def test_language_subset(tmp_path):
    _gen(tmp_path / "sw", languages="sw")
    rows = _rows(tmp_path / "sw")
    assert {r["src_lang"] for r in rows} == {"sw"} and len(rows) == 12
    assert os.listdir(tmp_path / "sw" / "wav") == ["sw"]
    _gen(tmp_path / "two", languages=["ga", "ar"], utterances_per_language=5)
    rows = _rows(tmp_path / "two")
    assert [r["src_lang"] for r in rows if r["split"] == "train"][0] == "ar"  # canonical order
    assert sorted({r["src_lang"] for r in rows}) == ["ar", "ga"] and len(rows) == 10


def _conflict_corpus(out, remap, **kw):
    cfg = _gen(out, languages="et", conflict=["xx:et"], conflict_remap=remap, families="unit",
               units="kilogram,meter", max_number=4, min_phrases=1, max_phrases=1, min_target_words=0,
               utterances_per_language=40, dev_fraction=0.0, test_fraction=0.25, **kw)
    return cfg, _rows(out), json.load(open(os.path.join(out, "corpus.json"), encoding="utf-8"))


def _assert_xx_means_the_permutation(rows, meta):
    """xx speech for (n, unit) is et speech for (map[n], map[unit]); the English says (n, unit)."""
    nmap = {int(k): v for k, v in meta["conflict"]["xx"]["number_map"].items()}
    umap = meta["conflict"]["xx"]["key_maps"]["unit"]
    et_words = {(p.n, p.key): ct.renderer("et").phrase(p) for p in
                [Phrase("unit", u, n) for u in ("kilogram", "meter") for n in range(1, 5)]}
    en_words = {ct.normalise_target(ct.renderer("en").phrase(Phrase("unit", u, n))): (n, u)
                for (n, u) in et_words}
    checked = 0
    for r in rows:
        n, u = en_words[r["tgt_text"]]
        if r["src_lang"] == "xx":
            assert r["src_text"] == et_words[(nmap[n], umap[u])]
            checked += 1
        else:
            assert r["src_text"] == et_words[(n, u)]
    assert checked == 40


def test_conflict_language_both(tmp_path):
    cfg, rows, meta = _conflict_corpus(tmp_path / "c", "both")
    assert cfg.all_languages == ("et", "xx") and cfg.conflict_speakers == "own"  # the default
    assert meta["settings"]["conflict_speakers"] == "own" and meta["conflict"]["xx"]["speakers"] == "own"
    spk = {lang: {r["speaker"] for r in rows if r["src_lang"] == lang} for lang in ("et", "xx")}
    assert spk["et"] and spk["xx"] and not spk["et"] & spk["xx"]
    assert all(r["speaker"].startswith(r["src_lang"] + "_s") for r in rows)
    variants = {lang: {v["variant"] for v in meta["speakers"].values() if v["lang"] == lang} for lang in ("et", "xx")}
    assert not variants["et"] & variants["xx"]
    assert all(v["voice"] == "et" for v in meta["speakers"].values())
    _assert_xx_means_the_permutation(rows, meta)
    nmap = {int(k): v for k, v in meta["conflict"]["xx"]["number_map"].items()}
    assert sorted(nmap) == sorted(nmap.values()) == [1, 2, 3, 4] and all(k != v for k, v in nmap.items())
    # The same Estonian words mean something else in xx.
    meaning = {lang: {r["src_text"]: r["tgt_text"] for r in rows if r["src_lang"] == lang} for lang in ("et", "xx")}
    shared = set(meaning["et"]) & set(meaning["xx"])
    assert len(shared) >= 4
    assert all(meaning["et"][s] != meaning["xx"][s] for s in shared)


def test_conflict_language_shared_speakers(tmp_path):
    """--conflict-speakers shared: xx is spoken by et's very speakers (same voice, variant, rate,
    pitch, word gap, gain; the speaker column says so), has sentences and splits of its own, and
    differs from et only by the permuted meaning; et itself is exactly as with own xx speakers."""
    cfg, rows, meta = _conflict_corpus(tmp_path / "s", "both", conflict_speakers="shared")
    assert cfg.conflict_speakers == "shared" and cfg.speakers_of("xx") == "et" and cfg.voiced_languages == ("et",)
    assert meta["settings"]["conflict_speakers"] == "shared" and meta["conflict"]["xx"]["speakers"] == "shared"
    assert meta["languages"]["xx"]["speakers_of"] == "et" and meta["languages"]["et"]["speakers_of"] == "et"
    speakers = C.assign_speakers(cfg)
    assert speakers["xx"] is speakers["et"]  # the same Speaker objects
    spk = {lang: {r["speaker"] for r in rows if r["src_lang"] == lang} for lang in ("et", "xx")}
    assert spk["xx"] == spk["et"] == {"et_s01", "et_s02"}
    assert sorted(meta["speakers"]) == ["et_s01", "et_s02"]
    assert all(v["lang"] == "et" and v["languages"] == ["et", "xx"] for v in meta["speakers"].values())
    # xx has its own utterances: its own ids, wavs, sentences and splits
    xx = [r for r in rows if r["src_lang"] == "xx"]
    assert len(xx) == 40 and all(r["id"].startswith("xx_") and r["audio"].startswith("wav/xx/") for r in xx)
    assert {r["split"] for r in xx} == {"train", "test"}
    _assert_xx_means_the_permutation(rows, meta)
    # et is unchanged by the mode (xx draws no speakers), and own mode gives xx voices of its own
    _, own_rows, own_meta = _conflict_corpus(tmp_path / "o", "both")
    assert [r for r in rows if r["src_lang"] == "et"] == [r for r in own_rows if r["src_lang"] == "et"]
    for r in rows:
        if r["src_lang"] == "et":
            with open(os.path.join(tmp_path / "s", r["audio"]), "rb") as a, \
                    open(os.path.join(tmp_path / "o", r["audio"]), "rb") as b:
                assert a.read() == b.read()
    # same meanings, same texts in both modes: only the voices of xx differ
    assert [(r["id"], r["src_text"], r["tgt_text"], r["split"]) for r in xx] == \
        [(r["id"], r["src_text"], r["tgt_text"], r["split"]) for r in own_rows if r["src_lang"] == "xx"]
    assert {r["speaker"] for r in own_rows if r["src_lang"] == "xx"} == {"xx_s01", "xx_s02"}
    own_variants = {v["variant"] for k, v in own_meta["speakers"].items() if k.startswith("xx_")}
    assert not own_variants & {v["variant"] for v in meta["speakers"].values()}


def test_shared_conflict_speakers_need_no_voice_variants():
    n = len(C.VOICE_VARIANTS) // 5 + 1  # 5 languages with own voices exceed the variants, 4 do not
    with pytest.raises(C.CorpusError, match="voice variants.*--conflict-speakers shared"):
        C.make_config("quick", conflict=["xx:et"], speakers_per_language=n)
    cfg = C.make_config("quick", conflict=["xx:et"], speakers_per_language=n, conflict_speakers="shared")
    speakers = C.assign_speakers(cfg)
    assert speakers["xx"] is speakers["et"]
    variants = [s.variant for lang in cfg.voiced_languages for s in speakers[lang]]
    assert len(variants) == 4 * n and len(set(variants)) == len(variants)


def test_bad_conflict_speakers(tmp_path, capsys):
    with pytest.raises(C.CorpusError, match="--conflict-speakers 'both'.*own, shared"):
        C.make_config("quick", conflict=["xx:et"], conflict_speakers="both")
    with pytest.raises(SystemExit) as e:
        make_corpus.main(["--out", str(tmp_path / "x"), "--conflict-language", "xx:et", "--conflict-speakers", "same"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--conflict-speakers" in err and "'same'" in err and "shared" in err
    assert not (tmp_path / "x").exists()


def test_conflict_language_numbers_only(tmp_path):
    _, rows, meta = _conflict_corpus(tmp_path / "n", "numbers")
    meaning = {lang: {r["src_text"]: r["tgt_text"] for r in rows if r["src_lang"] == lang} for lang in ("et", "xx")}
    shared = set(meaning["et"]) & set(meaning["xx"])
    assert shared
    for s in shared:
        a, b = meaning["et"][s].split(), meaning["xx"][s].split()
        assert a[-1].rstrip("s") == b[-1].rstrip("s") and a[:-1] != b[:-1]  # same unit, other number


def test_heldout_speakers_and_noise(tmp_path):
    _gen(tmp_path / "clean", languages="ar", heldout_test_speakers=1, seed=5)
    _gen(tmp_path / "noisy", languages="ar", heldout_test_speakers=1, seed=5, snr_db=10.0)
    clean, noisy = _rows(tmp_path / "clean"), _rows(tmp_path / "noisy")
    test_spk = {r["speaker"] for r in clean if r["split"] == "test"}
    other_spk = {r["speaker"] for r in clean if r["split"] != "test"}
    assert test_spk == {"ar_h01"} and not test_spk & other_spk
    assert [(r["id"], r["src_text"], r["duration"]) for r in clean] == [(r["id"], r["src_text"], r["duration"]) for r in noisy]
    r = clean[0]
    x = _read_wav(os.path.join(tmp_path / "clean", r["audio"]))
    y = _read_wav(os.path.join(tmp_path / "noisy", r["audio"]))
    noise = y - x
    speech = x[1600:-1600]
    snr = 10 * np.log10(np.mean(speech ** 2) / np.mean(noise ** 2))
    assert 7.0 < snr < 13.0, snr  # speech power is measured without the padding


def test_refuses_to_overwrite_without_force(base):
    with pytest.raises(C.CorpusError, match="--force"):
        C.generate(C.make_config("quick", **TINY), str(base), progress=False)


@pytest.mark.parametrize("kw, needle", [
    (dict(languages="ar,fr"), "'fr'"),
    (dict(languages="ar,ar"), "duplicate"),
    (dict(conflict=["xx:fr"]), "'fr'"),
    (dict(conflict=["et:ar"]), "'et'"),
    (dict(conflict=["xx"]), "NAME:BASE"),
    (dict(units="kilogram,parsec"), "'parsec'"),
    (dict(families="unit,poetry"), "'poetry'"),
    (dict(min_phrases=3, max_phrases=2), "--min-phrases"),
    (dict(test_fraction=0.6, dev_fraction=0.5), "train"),
    (dict(speakers_per_language=40), "voice variants"),
])
def test_bad_settings(kw, needle):
    with pytest.raises(C.CorpusError) as e:
        C.make_config("quick", **kw)
    assert needle in str(e.value)


def test_cli_bad_language_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        make_corpus.main(["--out", str(tmp_path / "x"), "--languages", "ar,zz"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown language 'zz'" in err and "ar, et, ga, sw" in err
    assert not (tmp_path / "x").exists()


def test_profiles_differ_in_domain():
    q, h = C.make_config("quick"), C.make_config("hard")
    assert q.max_number == 20 and q.min_target_words == 3 and len(q.units) == 6
    assert q.rel_units == ("day",) and q.families == ("unit", "rel")
    assert h.max_number > q.max_number and set(h.families) == set(ct.FAMILIES) and len(h.units) > 6
    assert C.make_config("full").utterances_per_language > q.utterances_per_language
    assert C.make_config("quick", max_number=7).max_number == 7  # flags override the profile


def test_text_grammar():
    """Spot checks of the CLDR renderings and the grammar repairs."""
    en, et, ga, sw, ar = (ct.renderer(l) for l in ("en", "et", "ga", "sw", "ar"))
    assert en.sentence([Phrase("unit", "kilogram", 3), Phrase("unit", "meter", 5)]) == "three kilograms and five meters"
    assert ct.normalise_target(en.phrase(Phrase("rel", "day", 21, "future"))) == "in twenty one days"
    assert en.phrase(Phrase("rel", "week", 1, "past")) == "one week ago"
    assert et.phrase(Phrase("rel", "day", 3, "future")) == "kolme päeva pärast"  # genitive before pärast
    assert et.phrase(Phrase("unit", "kilogram", 3)) == "kolm kilogrammi"
    assert ga.phrase(Phrase("unit", "gram", 13)) == "trí ghram déag"  # noun inside the teen
    assert ga.phrase(Phrase("unit", "meter", 2)) == "dhá mhéadar"
    assert sw.phrase(Phrase("rel", "year", 2, "past")) == "miaka miwili iliyopita"  # class-4 agreement
    assert sw.phrase(Phrase("unit", "kilogram", 3)) == "kilogramu tatu"  # noun before number
    assert sw.sentence([Phrase("unit", "kilogram", 3), Phrase("unit", "kilometer", 2)]) == "kilogramu tatu na kilomita mbili"
    assert ar.phrase(Phrase("rel", "day", 2, "past")) == "قبل يومين"  # dual, no number word
    assert ar.join(["أ", "ب"]) == "أ وب"


def test_arabic_number_guard(monkeypatch):
    import num2words

    assert ct.number_words("ar", 3) == "ثلاثة"
    monkeypatch.setitem(num2words.CONVERTER_CLASSES, "ar", num2words.CONVERTER_CLASSES["en"])
    ct._ar_converter_ok.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="Arabic"):
            ct.number_words("ar", 3)
    finally:
        monkeypatch.undo()
        ct._ar_converter_ok.cache_clear()


def test_arabic_is_diacritised():
    marks = C.diacritise(["خلال ثلاثة أيام", "قبل أربعة عشر يومًا"])
    assert marks["قبل أربعة عشر يومًا"].startswith("قَبْلَ ")
    for plain, voweled in marks.items():
        assert voweled != plain and ct.strip_harakat(voweled).split() == ct.strip_harakat(plain).split()
