"""Validation records of a fairseq-train log (``--log-format simple``)."""
from __future__ import annotations

import re
from pathlib import Path

_VALID = re.compile(r"valid on '(?P<subset>[^']+)' subset \| (?P<fields>.*)$")
_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


def read_validations(path: str | Path) -> list[dict]:
    """One dict per validation: subset, num_updates, loss, nll_loss, accuracy, wall (seconds
    since the log's first timestamp), in log order."""
    records, first_time = [], None
    from datetime import datetime

    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stamp = _TIME.match(line)
            if stamp:
                now = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")
                first_time = first_time or now
            match = _VALID.search(line)
            if not match:
                continue
            fields = dict(part.strip().split(" ", 1) for part in match.group("fields").split(" | ") if " " in part.strip())
            record = {"subset": match.group("subset")}
            for key in ("num_updates", "loss", "nll_loss", "accuracy", "ppl"):
                if key in fields:
                    record[key] = float(fields[key])
            record["wall"] = (now - first_time).total_seconds() if stamp else None
            records.append(record)
    return records
