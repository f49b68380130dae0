"""CI gates over report rows: 'metric>=value', optionally limited to some rows.

    psnr>=30                                     every row (the baseline excepted)
    *-w8a8/sampler.onnx@onnxruntime:latency_ms<=50   rows whose artifact and runtime match the globs
"""
from __future__ import annotations

import fnmatch
import operator
import re
from dataclasses import dataclass

from compress.errors import UserError

OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_PATTERN = re.compile(r"^\s*(?:([^:@\s]+)(?:@([^:@\s]+))?:)?([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|>|<)\s*(-?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$")


@dataclass(frozen=True)
class Check:
    text: str
    metric: str
    op: str
    value: float
    artifact: str = "*"  # glob over the row's artifact
    runtime: str = "*"  # glob over the row's runtime

    def applies_to(self, row: dict) -> bool:
        return fnmatch.fnmatchcase(row["artifact"], self.artifact) and fnmatch.fnmatchcase(row["runtime"], self.runtime)

    def holds(self, measured: float) -> bool:
        return OPERATORS[self.op](measured, self.value)


def parse_checks(texts: list[str]) -> list[Check]:
    checks = []
    for text in texts:
        match = _PATTERN.match(text)
        if not match:
            raise UserError(f"malformed check {text!r}: expected [ARTIFACT[@RUNTIME]:]METRIC OP NUMBER, e.g. 'psnr>=30'")
        checks.append(Check(text, match[3], match[4], float(match[5]), match[1] or "*", match[2] or "*"))
    return checks


def evaluate_checks(checks: list[Check], rows: list[dict]) -> list[dict]:
    """Every check must hold on every row; a metric missing from all rows is an error."""
    results = []
    for check in checks:
        selected = [r for r in rows if check.applies_to(r)]
        if not selected:
            raise UserError(f"check {check.text!r}: no row matches {check.artifact}@{check.runtime} "
                            f"(rows: {', '.join(sorted({r['artifact'] + '@' + r['runtime'] for r in rows}))})")
        measured = [(r["artifact"], r["runtime"], r[check.metric]) for r in selected if r.get(check.metric) is not None]
        if not measured:
            known = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
            raise UserError(f"check {check.text!r}: no row reports metric {check.metric!r} (known: {', '.join(known)})")
        failing = [f"{a} on {rt}: {v:.4g}" for a, rt, v in measured if not check.holds(v)]
        results.append({"check": check.text, "passed": not failing, "detail": "; ".join(failing)})
    return results
