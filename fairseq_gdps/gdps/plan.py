"""The GDPS plan: which modules to split, the language groups and the shared ratio.

``plan.json`` is the contract between ``gdps-analyze`` and stage-2 training. It is written
atomically as JSON with sorted keys and an indent of 2, holds no timestamp, and rounds floats to
10 significant digits, so identical inputs give identical bytes. Nothing in it is a path that a
later stage reads: its provenance names the statistics file relative to the plan's folder, so a
moved run folder keeps the record true.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Iterable, List, Optional

from fairseq_gdps.atomic import atomic_write
from fairseq_gdps.data.manifest import LANG_CODE_HELP, is_language_code

PLAN_VERSION = 1
PLAN_KIND = "gdps-plan"
PROVENANCE_PATHS = ("stats_file",)  # provenance entries that name a file: saved relative to the plan's folder


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model or data."""


def _clean(x):
    """JSON-safe, deterministic copy: floats rounded to 10 significant digits, NaN/inf -> None."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float) or type(x).__name__.startswith("float"):
        x = float(x)
        if not math.isfinite(x):
            return None
        rounded = float(f"{x:.10g}")
        return rounded if math.isfinite(rounded) else x  # 1.79e308 would round up to inf
    if type(x).__name__.startswith("int") or type(x).__name__.startswith("uint"):
        return int(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "tolist"):
        return _clean(x.tolist())
    raise TypeError(f"cannot store {type(x).__name__} in a plan")


@dataclass
class Plan:
    modules: List[str]                                   # modules to split, most conflicting first
    groups: List[List[str]]                              # language groups (partition)
    shared_ratio: float                                  # share of each split module kept shared, in [0, 1)
    language_to_group: Dict[str, int] = field(default_factory=dict)
    scores: Dict[str, Dict[str, Optional[float]]] = field(default_factory=dict)  # every module's scores
    provenance: dict = field(default_factory=dict)       # stats file + sha256, settings (no timestamp)
    version: int = PLAN_VERSION
    kind: str = PLAN_KIND

    def __post_init__(self):
        self.modules = [str(m) for m in self.modules]
        self.groups = [[str(l) for l in g] for g in self.groups]
        if not self.language_to_group:
            self.language_to_group = {l: gi for gi, g in enumerate(self.groups) for l in g}
        self.language_to_group = {str(k): int(v) for k, v in self.language_to_group.items()}

    @property
    def languages(self) -> List[str]:
        return [l for g in self.groups for l in g]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def group_of(self, language: str) -> int:
        try:
            return self.language_to_group[language]
        except KeyError:
            raise PlanError(f"language {language!r} is not in the plan "
                            f"(plan languages: {sorted(self.language_to_group)})") from None

    # ------------------------------------------------------------------ checks
    def validate(self, model_module_names: Optional[Iterable[str]] = None,
                 languages: Optional[Iterable[str]] = None) -> "Plan":
        """Raise ``PlanError`` unless the plan is well-formed and fits the model/data given."""
        if self.kind != PLAN_KIND:
            raise PlanError(f"not a GDPS plan (kind {self.kind!r})")
        if self.version != PLAN_VERSION:
            raise PlanError(f"plan version {self.version!r} is not supported (this code reads {PLAN_VERSION})")
        if not self.modules:
            raise PlanError("the plan names no module to split")
        if len(set(self.modules)) != len(self.modules):
            raise PlanError(f"the plan names a module twice: {self.modules}")
        r = self.shared_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 <= r < 1:
            raise PlanError(f"shared_ratio must lie in [0, 1), got {r!r}")
        if not 0 <= _clean(float(r)) < 1:  # as stored: 10 significant digits
            raise PlanError(f"shared_ratio {r!r} is stored as {_clean(float(r))!r}: it must lie in [0, 1) with "
                            f"10 significant digits")
        for m in self.modules:  # joined with ',' into --gdps-split-modules when the plan is resolved
            if not m or m != m.strip() or "," in m or any(c.isspace() for c in m):
                raise PlanError(f"invalid module name {m!r} (no spaces or commas)")
        if not self.groups or any(len(g) == 0 for g in self.groups):
            raise PlanError(f"groups must be non-empty lists of languages, got {self.groups}")
        for g in self.groups:  # joined with ',' and ';' into --gdps-groups when the plan is resolved
            for l in g:
                if not is_language_code(l):
                    raise PlanError(f"invalid language {l!r} in groups ({LANG_CODE_HELP})")
        seen: Dict[str, int] = {}
        for gi, g in enumerate(self.groups):
            for l in g:
                if l in seen:
                    raise PlanError(f"language {l!r} is in group {seen[l]} and in group {gi}: groups overlap")
                seen[l] = gi
        if seen != self.language_to_group:
            raise PlanError(f"language_to_group {self.language_to_group} does not match groups {self.groups}")
        if model_module_names is not None:
            have = set(model_module_names)
            missing = [m for m in self.modules if m not in have]
            if missing:
                raise PlanError(f"the model has no module {missing} named in the plan "
                                f"(model modules: {', '.join(sorted(have)) or '(none)'})")
        if languages is not None:
            data = list(dict.fromkeys(languages))
            not_in_plan = [l for l in data if l not in seen]
            if not_in_plan:
                raise PlanError(f"languages {not_in_plan} of the data are in no group of the plan "
                                f"(groups {self.groups}): the groups do not cover every language")
            not_in_data = [l for l in seen if l not in set(data)]
            if not_in_data:
                raise PlanError(f"plan languages {not_in_data} are missing from the data (data languages: {data})")
        return self

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return _clean(asdict(self))

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, allow_nan=False) + "\n"

    def save(self, path) -> None:
        """Write atomically: temporary file in the same folder, then ``os.replace``. A plan that
        ``load`` would refuse is not written (PlanError, the file stays as it was). The provenance's
        file paths are written relative to the plan's folder."""
        self.validate()
        folder = os.path.dirname(os.path.abspath(path))
        provenance = {k: os.path.relpath(v, folder) if k in PROVENANCE_PATHS and isinstance(v, str) and v else v
                      for k, v in self.provenance.items()}
        with atomic_write(path) as f:
            f.write(replace(self, provenance=provenance).dumps())

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> "Plan":
        """A plan from its JSON object; the field types are checked here (a string where a list
        belongs would otherwise be taken apart letter by letter), the content by ``validate``."""
        if not isinstance(d, dict):
            raise PlanError(f"{source}: a plan is a JSON object, got {type(d).__name__}")
        if d.get("kind", PLAN_KIND) != PLAN_KIND:
            raise PlanError(f"{source}: not a GDPS plan (kind {d.get('kind')!r})")
        if type(d.get("version")) is not int or d.get("version") != PLAN_VERSION:
            raise PlanError(f"{source}: plan version {d.get('version')!r} is not supported (this code reads {PLAN_VERSION})")
        missing = [k for k in ("modules", "groups", "shared_ratio") if k not in d]
        if missing:
            raise PlanError(f"{source}: plan lacks {missing}")

        def is_str_list(x):
            return isinstance(x, list) and all(isinstance(v, str) for v in x)

        problems = []
        if not is_str_list(d["modules"]):
            problems.append(f"modules must be a list of module names, got {d['modules']!r}")
        if not (isinstance(d["groups"], list) and all(is_str_list(g) for g in d["groups"])):
            problems.append(f"groups must be a list of lists of languages, got {d['groups']!r}")
        r = d["shared_ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            problems.append(f"shared_ratio must be a number, got {r!r}")
        l2g = d.get("language_to_group", {})
        if not (isinstance(l2g, dict) and all(type(v) is int for v in l2g.values())):
            problems.append(f"language_to_group must map languages to group numbers, got {l2g!r}")
        scores = d.get("scores", {})
        if not (isinstance(scores, dict) and all(isinstance(v, dict) for v in scores.values())):
            problems.append("scores must map module names to objects")
        if not isinstance(d.get("provenance", {}), dict):
            problems.append("provenance must be an object")
        if problems:
            raise PlanError(f"{source}: malformed plan: " + "; ".join(problems))
        known = {"modules", "groups", "shared_ratio", "language_to_group", "scores", "provenance", "version", "kind"}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path, model_module_names: Optional[Iterable[str]] = None,
             languages: Optional[Iterable[str]] = None) -> "Plan":
        """Read and validate a plan file (errors name the file)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{path}: not valid JSON ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise PlanError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}): not a plan.json") from None
        except RecursionError:
            raise PlanError(f"{path}: JSON nested too deeply to be a plan") from None
        except OSError as exc:
            raise PlanError(f"{path}: cannot read the plan ({exc.strerror or exc})") from None
        plan = cls.from_dict(d, source=path)
        try:
            plan.validate(model_module_names=model_module_names, languages=languages)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None
        return plan
