"""Parallel text (X -> English) built from CLDR data shipped with Babel.

Every sentence is a list of *phrases*, each a small piece of meaning:

* ``unit``  -- a number with a unit of measurement ("three kilograms"),
  from CLDR unit patterns chosen by plural category;
* ``rel``   -- a relative time ("in three days", "three days ago"), from the
  CLDR relative-time patterns;
* ``money`` -- a number with a currency ("three euros"), from CLDR currency
  names by plural category;
* ``name``  -- a weekday, month or country name.

Phrases are joined with the language's CLDR list pattern ("X and Y").  Numbers
are spelled out in words on both sides (``unicode-rbnf`` for et/ga/sw/en,
``num2words`` for Arabic).  All human-language content comes from CLDR
translations; the code only adds a few grammar repairs CLDR patterns cannot
express (Estonian genitive numbers before postpositions, Irish "dhá" and the
noun inside 11-19, Swahili class-4 number agreement).  English text is
returned as written by CLDR; :func:`normalise_target` lower-cases it and drops
punctuation for use as a translation target.

Pure Python (Babel, unicode-rbnf, num2words); no fairseq import.
"""
from __future__ import annotations

import functools
import re
from typing import Dict, List, NamedTuple, Sequence, Tuple

#: Source languages (espeak-ng voice names are the same codes).
LANGUAGES: Tuple[str, ...] = ("ar", "et", "ga", "sw")

#: Short unit name -> CLDR unit key.  Every entry was checked to have a
#: spelled-out (not abbreviated) form in all of en, ar, et, ga, sw.
UNIT_CATALOG: Dict[str, str] = {
    "kilogram": "mass-kilogram",
    "gram": "mass-gram",
    "meter": "length-meter",
    "kilometer": "length-kilometer",
    "liter": "volume-liter",
    "centimeter": "length-centimeter",
    "millimeter": "length-millimeter",
    "milliliter": "volume-milliliter",
    "mile": "length-mile",
    "night": "duration-night",
    "day": "duration-day",
    "month": "duration-month",
    "hectare": "area-hectare",
    "calorie": "energy-calorie",
    "kilocalorie": "energy-kilocalorie",
    "megabyte": "digital-megabyte",
    "square-meter": "area-square-meter",
    "cubic-meter": "volume-cubic-meter",
    "degree-celsius": "temperature-celsius",
    "pound": "mass-pound",
    "teaspoon": "volume-teaspoon",
    "gallon": "volume-gallon",
    "metric-ton": "mass-tonne",
}
#: Relative-time units (CLDR date fields) and directions.
REL_UNITS: Tuple[str, ...] = ("day", "week", "month", "year", "hour", "minute")
REL_DIRECTIONS: Tuple[str, ...] = ("future", "past")
#: ISO 4217 codes with spelled-out names in all five languages.
CURRENCIES: Tuple[str, ...] = ("EUR", "GBP", "KES", "JPY", "INR", "EGP", "TZS", "CNY")
#: Name lists: weekday (Babel index 0 = Monday), month (1..12), country (CLDR territory).
NAME_KINDS: Dict[str, Tuple[str, ...]] = {
    "weekday": tuple(str(i) for i in range(7)),
    "month": tuple(str(i) for i in range(1, 13)),
    "country": ("KE", "EE", "IE", "EG", "TZ", "FR", "JP", "BR", "IN", "CN", "DE", "MA"),
}
FAMILIES: Tuple[str, ...] = ("unit", "rel", "money", "name")

_AR_HARAKAT = re.compile("[\u064b-\u0652\u0670\u0640]")
_BAD_CHARS = re.compile(r"[./°²³\d]")
_LATIN_VOWELS = set("aeiouyáéíóúàèìòùäöõüâêîôûAEIOUYÁÉÍÓÚÄÖÕÜ")


class Phrase(NamedTuple):
    """One piece of meaning.

    family: unit | rel | money | name; key: unit short name, relative unit,
    currency code or ``kind:item``; n: the number (0 for names); aux: the
    direction for ``rel`` (future/past), else "".
    """

    family: str
    key: str
    n: int = 0
    aux: str = ""


def group_of(p: Phrase) -> str:
    """Keys that can be permuted among each other (for conflict languages)."""
    if p.family == "name":
        return "name:" + p.key.split(":", 1)[0]
    return p.family


def all_keys(families: Sequence[str], units: Sequence[str], rel_units: Sequence[str],
             currencies: Sequence[str] = CURRENCIES) -> Dict[str, List[str]]:
    """Key inventory per permutation group."""
    out: Dict[str, List[str]] = {}
    if "unit" in families:
        out["unit"] = list(units)
    if "rel" in families:
        out["rel"] = list(rel_units)
    if "money" in families:
        out["money"] = list(currencies)
    if "name" in families:
        for kind, items in NAME_KINDS.items():
            out["name:" + kind] = [f"{kind}:{i}" for i in items]
    return out


# --------------------------------------------------------------------------- numbers
@functools.lru_cache(maxsize=None)
def _rbnf(lang: str):
    import logging

    from unicode_rbnf import RbnfEngine

    # unicode-rbnf logs "Skipping ruleset" on the root logger at DEBUG level.
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        return RbnfEngine.for_language(lang)
    finally:
        logging.disable(previous)


def _rbnf_words(lang: str, n: int, ruleset: str) -> str:
    res = _rbnf(lang).format_number(n, ruleset_names=[ruleset])
    text = res.text if hasattr(res, "text") else str(res)
    if not text or any(ch.isdigit() for ch in text):
        raise RuntimeError(f"unicode-rbnf could not spell {n} in {lang!r}: {text!r}")
    return text


@functools.lru_cache(maxsize=None)
def _ar_converter_ok() -> bool:
    import num2words

    conv = num2words.CONVERTER_CLASSES.get("ar")
    # num2words silently falls back to another language for unknown codes:
    # make sure 'ar' really is the Arabic converter.
    if conv is None or not type(conv).__module__.endswith("lang_AR"):
        raise RuntimeError("num2words has no Arabic converter (lang_AR); cannot spell Arabic numbers")
    return True


def number_words(lang: str, n: int) -> str:
    """Cardinal number in words, in the form used before/after a counted noun."""
    if n < 0:
        raise ValueError("negative numbers are not supported")
    if lang == "ar":
        _ar_converter_ok()
        import num2words

        text = num2words.num2words(n, lang="ar")
        # "واحد و عشرون" -> "واحد وعشرون" (the conjunction is a prefix)
        return re.sub(r"\s+و\s+", " و", text).strip()
    if lang == "en":
        return _rbnf_words("en", n, "spellout-numbering").replace("-", " ")
    if lang == "ga":
        if n in _GA_COUNTING:
            return _GA_COUNTING[n]  # counting forms before a noun
        return _rbnf_words("ga", n, "spellout-numbering-no-a")
    if lang in ("et", "sw"):
        return _rbnf_words(lang, n, "spellout-cardinal")
    raise ValueError(f"no number speller for language {lang!r}")


_GA_COUNTING = {2: "dhá", 4: "ceithre"}

_ET_GEN = {
    "null": "nulli", "üks": "ühe", "kaks": "kahe", "kolm": "kolme", "neli": "nelja",
    "viis": "viie", "kuus": "kuue", "seitse": "seitsme", "kaheksa": "kaheksa",
    "üheksa": "üheksa", "kümme": "kümne", "sada": "saja", "tuhat": "tuhande",
}


def _et_genitive_token(tok: str) -> str:
    if tok in _ET_GEN:
        return _ET_GEN[tok]
    for suffix, gen in (("teist", "teistkümne"), ("kümmend", "kümne"), ("sada", "saja"), ("tuhat", "tuhande")):
        if tok.endswith(suffix) and tok[: -len(suffix)] in _ET_GEN:
            return _ET_GEN[tok[: -len(suffix)]] + gen
    return tok


def et_genitive(words: str) -> str:
    """Estonian number words in the genitive ("kolm" -> "kolme"), as required
    before the postpositions pärast/eest of CLDR relative-time patterns."""
    return " ".join(_et_genitive_token(t) for t in words.split())


_SW_CLASS4 = {"moja": "mmoja", "mbili": "miwili", "tatu": "mitatu", "nne": "minne", "tano": "mitano", "nane": "minane"}
_SW_CLASS34_NOUNS = {"miaka", "mwaka", "miezi", "mwezi"}


# --------------------------------------------------------------------------- CLDR access
def _plain(d):
    if hasattr(d, "items"):
        return {k: _plain(v) for k, v in d.items()}
    return d


def pattern_ok(pattern: str) -> bool:
    """True if a CLDR pattern is spelled out (no abbreviation, symbol or digit)."""
    body = pattern.replace("{0}", " ").replace("{1}", " ")
    if _BAD_CHARS.search(body):
        return False
    for tok in body.split():
        if tok.isalpha() and all("a" <= c.lower() <= "z" or c in _LATIN_VOWELS for c in tok):
            if not any(c in _LATIN_VOWELS for c in tok):
                return False  # e.g. "bhl", "scht": an abbreviation
    return True


class Renderer:
    """Renders phrases in one language (``en`` or one of :data:`LANGUAGES`)."""

    def __init__(self, lang: str):
        from babel import Locale

        if lang not in LANGUAGES and lang != "en":
            raise ValueError(f"unknown language {lang!r}")
        self.lang = lang
        self.locale = Locale.parse(lang)
        self._data = self.locale._data
        lp = _plain(self._data["list_patterns"]["standard"])
        self._list = {k: lp[k] for k in ("2", "start", "middle", "end")}

    # -- helpers
    def plural(self, n: int) -> str:
        return self.locale.plural_form(n)

    @functools.lru_cache(maxsize=None)
    def unit_forms(self, unit: str) -> Dict[str, str]:
        key = UNIT_CATALOG[unit]
        up = _plain(self._data["unit_patterns"].get(key, {}))
        for length in ("long", "short"):
            forms = {c: v for c, v in up.get(length, {}).items() if c not in ("per", "gender", "dnam")}
            if "other" in forms:
                return forms
        raise KeyError(f"CLDR has no pattern for unit {unit!r} in {self.lang!r}")

    def rel_forms(self, unit: str, direction: str) -> Dict[str, str]:
        return _plain(self._data["date_fields"][unit][direction])

    def money_forms(self, code: str) -> Dict[str, str]:
        """Plural category -> pattern with {0} (number) for a currency."""
        names = _plain(self._data.get("currency_names_plural", {})).get(code) or {}
        display = self.locale.currencies.get(code)
        unit_pat = _plain(self._data.get("currency_unit_patterns", {})) or {"other": "{0} {1}"}
        cats = set(names) | set(unit_pat) | {"other"}
        out = {}
        for c in cats:
            name = names.get(c) or names.get("other") or display
            if not name:
                raise KeyError(f"CLDR has no name for currency {code} in {self.lang!r}")
            pat = unit_pat.get(c) or unit_pat["other"]
            out[c] = pat.replace("{1}", name)
        return out

    def check_unit(self, unit: str) -> List[str]:
        """Return the bad (abbreviated) patterns for a unit, empty if all fine."""
        return [p for p in self.unit_forms(unit).values() if not pattern_ok(p)]

    # -- counted nouns
    def _counted(self, forms: Dict[str, str], n: int, postposition_genitive: bool = False) -> str:
        lang = self.lang
        if lang == "ga" and 11 <= n <= 19:
            # Irish puts the noun inside the teen: "trí chileagram déag".
            base = n - 10
            pat = forms.get(self.plural(base)) or forms["other"]
            words = number_words("ga", base)
            before, _, after = pat.partition("{0}")
            toks = after.split()
            tail = " ".join(toks[:1] + ["déag"] + toks[1:])
            return " ".join((before.strip() + " " + words + " " + tail).split())
        pat = forms.get(self.plural(n)) or forms["other"]
        words = number_words(lang, n)
        if lang == "et" and postposition_genitive:
            words = et_genitive(words)
        if lang == "sw":
            before = pat.partition("{0}")[0].split()
            if before and before[-1] in _SW_CLASS34_NOUNS:
                toks = words.split()
                toks[-1] = _SW_CLASS4.get(toks[-1], toks[-1])
                words = " ".join(toks)
        return " ".join(pat.replace("{0}", words).split())

    def phrase(self, p: Phrase) -> str:
        if p.family == "unit":
            return self._counted(self.unit_forms(p.key), p.n)
        if p.family == "rel":
            forms = self.rel_forms(p.key, p.aux)
            return self._counted(forms, p.n, postposition_genitive=(self.lang == "et"))
        if p.family == "money":
            return self._counted(self.money_forms(p.key), p.n)
        if p.family == "name":
            kind, item = p.key.split(":", 1)
            if kind == "weekday":
                return self.locale.days["format"]["wide"][int(item)]
            if kind == "month":
                return self.locale.months["stand-alone"]["wide"][int(item)]
            if kind == "country":
                return self.locale.territories[item]
        raise ValueError(f"bad phrase {p!r}")

    def join(self, parts: Sequence[str], conj_prefix: str | None = None) -> str:
        """CLDR list formatting ("A, B and C").  ``conj_prefix`` replaces the
        Arabic prefix conjunction "و" (used to give it a vowel mark for TTS)."""
        pats = dict(self._list)
        if conj_prefix is not None:
            pats = {k: v.replace(" و{1}", " " + conj_prefix + "{1}") for k, v in pats.items()}
        parts = list(parts)
        if not parts:
            return ""
        if len(parts) == 1:
            return parts[0]
        if len(parts) == 2:
            return pats["2"].format(parts[0], parts[1])
        out = pats["end"].format(parts[-2], parts[-1])
        for mid in reversed(parts[1:-2]):
            out = pats["middle"].format(mid, out)
        return pats["start"].format(parts[0], out)

    def sentence(self, phrases: Sequence[Phrase]) -> str:
        return self.join([self.phrase(p) for p in phrases])


@functools.lru_cache(maxsize=None)
def renderer(lang: str) -> Renderer:
    return Renderer(lang)


def normalise_target(text: str) -> str:
    """Lower-case, drop punctuation (commas, periods), single spaces."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^\w\s']", " ", text)
    return " ".join(text.split())


def clean_text(text: str) -> str:
    """No tabs/newlines/control characters; single spaces."""
    return " ".join("".join(" " if (c.isspace() or ord(c) < 32) else c for c in text).split())


def strip_harakat(text: str) -> str:
    return _AR_HARAKAT.sub("", text)


def english_words(phrases: Sequence[Phrase]) -> int:
    return len(normalise_target(renderer("en").sentence(phrases)).split())


def bad_units(units: Sequence[str], langs: Sequence[str]) -> Dict[str, List[Tuple[str, str]]]:
    """Units whose CLDR patterns are abbreviated in one of ``langs`` (or en)."""
    out: Dict[str, List[Tuple[str, str]]] = {}
    for u in units:
        for lang in list(langs) + ["en"]:
            for p in renderer(lang).check_unit(u):
                out.setdefault(u, []).append((lang, p))
    return out
