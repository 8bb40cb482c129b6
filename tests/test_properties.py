"""Property-based tests (hypothesis) of the two readers of user-made files: the corpus TSV reader
(valid rows round-trip, garbage lines are reported by line, never crash) and the plan loader
(any JSON gives a valid Plan or a PlanError; save/load round-trips)."""
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fairseq_gdps.cli.prep import prepare
from fairseq_gdps.data.manifest import PrepError, manifest_text, read_corpus_tsv, read_manifest
from fairseq_gdps.gdps.plan import PLAN_KIND, PLAN_VERSION, Plan, PlanError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------ corpus TSV

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+@=,-]{0,12}", fullmatch=True)
languages = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,6}", fullmatch=True)
# field text as the reader keeps it: no field/line separators, no surrounding white space
FIELD_BREAKS = "\t\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029"
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=FIELD_BREAKS),
                min_size=1, max_size=30).map(str.strip).filter(bool)
durations = st.none() | st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def corpus_rows(draw):
    uids = draw(st.lists(ids, min_size=1, max_size=6, unique=True))
    return [dict(id=uid, src_lang=draw(languages), tgt_text=draw(texts), tgt_lang=draw(languages),
                 speaker=draw(st.just("") | texts), src_text=draw(st.just("") | texts), duration=draw(durations))
            for uid in uids]


COLUMNS = ["id", "audio", "src_lang", "tgt_text", "tgt_lang", "speaker", "src_text", "duration"]


def write_tsv(folder: Path, rows, columns, extra_lines=()):
    """train.tsv with ``columns`` in the given order (audio files are empty placeholders: the reader
    only checks that they exist). ``extra_lines``: (position, raw bytes) inserted among the rows."""
    (folder / "wav").mkdir(exist_ok=True)
    lines = ["\t".join(columns).encode()]
    for r in rows:
        (folder / "wav" / f"{r['id']}.wav").write_bytes(b"")
        values = {**r, "audio": f"wav/{r['id']}.wav", "duration": "" if r["duration"] is None else repr(r["duration"])}
        lines.append("\t".join(values[c] for c in columns).encode("utf-8"))
    for pos, raw in sorted(extra_lines, key=lambda x: x[0], reverse=True):
        lines.insert(1 + min(pos, len(lines) - 1), raw)
    (folder / "train.tsv").write_bytes(b"\n".join(lines) + b"\n")
    return folder / "train.tsv"


@SETTINGS
@given(rows=corpus_rows(), column_order=st.permutations(COLUMNS))
def test_valid_rows_round_trip(rows, column_order):
    with tempfile.TemporaryDirectory() as tmp:
        tsv = write_tsv(Path(tmp), rows, column_order)
        got, bad = read_corpus_tsv(str(tsv), "train", tmp)
        assert bad == []
        assert [(r.line, r.id, r.src_lang, r.tgt_text, r.tgt_lang, r.speaker, r.src_text, r.duration) for r in got] \
            == [(i + 2, r["id"], r["src_lang"], r["tgt_text"], r["tgt_lang"], r["speaker"], r["src_text"], r["duration"])
                for i, r in enumerate(rows)]
        assert all(r.audio_path == os.path.join(tmp, "wav", f"{r.id}.wav") for r in got)
        # and through the manifest writer and fairseq's manifest reader
        for i, r in enumerate(got):
            r.zip_ptr, r.n_frames = f"fbank80.zip:{64 * i}:{1000 + i}", 7 + i
        Path(tmp, "m.tsv").write_text(manifest_text(got), encoding="utf-8")
        back = read_manifest(os.path.join(tmp, "m.tsv"))
        assert [(m["id"], m["audio"], int(m["n_frames"]), m["tgt_text"], m["speaker"], m["src_text"], m["src_lang"],
                 m["tgt_lang"]) for m in back] \
            == [(r.id, r.zip_ptr, r.n_frames, r.tgt_text, r.speaker, r.src_text, r.src_lang, r.tgt_lang) for r in got]


garbage_lines = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")) | st.lists(
    st.text(max_size=12), max_size=10).map(lambda fs: "\t".join(fs).replace("\n", "").encode("utf-8", "surrogatepass"))


@SETTINGS
@given(rows=corpus_rows(), garbage=st.lists(st.tuples(st.integers(0, 6), garbage_lines), min_size=1, max_size=4))
def test_garbage_lines_are_reported_by_line_never_raised(rows, garbage):
    with tempfile.TemporaryDirectory() as tmp:
        tsv = write_tsv(Path(tmp), rows, COLUMNS, extra_lines=garbage)
        got, bad = read_corpus_tsv(str(tsv), "train", tmp)
        lines = tsv.read_bytes().split(b"\n")
        nonblank = {i + 1 for i, b in enumerate(lines) if i > 0 and b.rstrip(b"\r").strip()}
        reported = [r.line for r in got] + [b.line for b in bad]
        assert sorted(reported) == sorted(nonblank)  # every line once: a row or a bad line
        assert {r["id"] for r in rows} <= {r.id for r in got}  # garbage does not hide valid rows
        for b in bad:
            assert b.file == str(tsv) and str(b).startswith(f"{tsv}:{b.line}: ") and b.reason


@SETTINGS
@given(garbage=garbage_lines)
def test_prep_fails_on_a_garbage_line_with_a_prep_error_naming_it(garbage):
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus")
        corpus.mkdir()
        tsv = write_tsv(corpus, [], COLUMNS, extra_lines=[(0, garbage)])
        with pytest.raises(PrepError) as err:
            prepare(str(corpus), os.path.join(tmp, "out"), vocab_size=8, jobs=1, splits=("train",), quiet=True)
        if garbage.rstrip(b"\r").strip():
            assert str(err.value).startswith(f"{tsv}:2: ")
        else:  # a blank line is no line: nothing to train on
            assert str(err.value) == f"{tsv}: no usable training utterances"
        assert not os.path.exists(os.path.join(tmp, "out"))


# ----------------------------------------------------------------------------------- plans

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
module_names = st.from_regex(r"(encoder\.transformer_layers|decoder\.layers)\.[0-9]\.ffn", fullmatch=True)


@st.composite
def valid_plans(draw):
    langs = draw(st.lists(languages, min_size=1, max_size=6, unique=True))
    n_groups = draw(st.integers(1, len(langs)))
    cuts = sorted(draw(st.lists(st.integers(1, len(langs) - 1), min_size=n_groups - 1, max_size=n_groups - 1,
                                unique=True))) if n_groups > 1 else []
    bounds = [0, *cuts, len(langs)]
    groups = [langs[a:b] for a, b in zip(bounds, bounds[1:])]
    modules = draw(st.lists(module_names, min_size=1, max_size=4, unique=True))
    ratio = draw(st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True))
    scores = draw(st.dictionaries(module_names, st.dictionaries(st.text(max_size=6), st.none() | st.floats()),
                                  max_size=3))
    return Plan(modules=modules, groups=groups, shared_ratio=ratio, scores=scores,
                provenance=draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)))


@st.composite
def plan_like(draw):
    """A JSON object with the plan's keys, each either right or arbitrary (to reach every check)."""
    good = draw(valid_plans()).to_dict()
    out = {}
    for key, value in good.items():
        choice = draw(st.sampled_from(["keep", "keep", "replace", "drop"]))
        if choice == "keep":
            out[key] = value
        elif choice == "replace":
            out[key] = draw(json_values)
    return out


@SETTINGS
@given(content=json_values | plan_like() | valid_plans().map(Plan.to_dict))
def test_plan_loader_gives_a_valid_plan_or_plan_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "plan.json")
        path.write_text(json.dumps(content), encoding="utf-8")  # NaN/Infinity as Python writes them
        try:
            plan = Plan.load(path)
        except PlanError as exc:
            assert str(exc).startswith(f"{path}: ")
            return
        plan.validate()
        assert isinstance(content, dict) and content.get("kind", PLAN_KIND) == PLAN_KIND
        assert content["version"] == PLAN_VERSION and plan.modules == content["modules"]
        assert plan.groups == content["groups"] and 0 < plan.shared_ratio < 1
        plan.save(Path(tmp, "again.json"))
        again = Plan.load(Path(tmp, "again.json"))
        assert again.dumps() == plan.dumps()


@SETTINGS
@given(raw=st.binary(max_size=80))
def test_plan_loader_on_arbitrary_bytes(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "plan.json")
        path.write_bytes(raw)
        with pytest.raises(PlanError, match=f"^{path}: "):
            Plan.load(path)


@SETTINGS
@given(plan=valid_plans())
def test_plan_save_load_round_trip(plan):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "plan.json")
        if not 0 < float(f"{plan.shared_ratio:.10g}") < 1:  # e.g. 0.99999999999 would be stored as 1
            with pytest.raises(PlanError, match="is stored as"):
                plan.save(path)
            assert os.listdir(tmp) == []  # a plan that load would refuse is not written
            return
        plan.save(path)
        back = Plan.load(path, languages=plan.languages, model_module_names=plan.modules)
        assert back.modules == plan.modules and back.groups == plan.groups
        assert back.language_to_group == plan.language_to_group
        assert back.shared_ratio == float(f"{plan.shared_ratio:.10g}")  # stored with 10 significant digits
        assert back.to_dict() == plan.to_dict()
        back.save(path)
        assert path.read_text(encoding="utf-8") == plan.dumps()  # byte-identical once stored
        assert os.listdir(tmp) == ["plan.json"]
