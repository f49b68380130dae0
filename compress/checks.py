"""CI gates: 'metric>=value' checks over report rows."""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from compress.errors import UserError

OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_PATTERN = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|>|<)\s*(-?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$")


@dataclass(frozen=True)
class Check:
    text: str
    metric: str
    op: str
    value: float

    def holds(self, measured: float) -> bool:
        return OPERATORS[self.op](measured, self.value)


def parse_checks(texts: list[str]) -> list[Check]:
    checks = []
    for text in texts:
        match = _PATTERN.match(text)
        if not match:
            raise UserError(f"malformed check {text!r}: expected METRIC OP NUMBER, e.g. 'psnr>=30'")
        checks.append(Check(text, match[1], match[2], float(match[3])))
    return checks


def evaluate_checks(checks: list[Check], rows: list[dict]) -> list[dict]:
    """Every check must hold on every row; a metric missing from all rows is an error."""
    results = []
    for check in checks:
        measured = [(r["artifact"], r["runtime"], r[check.metric]) for r in rows if r.get(check.metric) is not None]
        if not measured:
            known = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
            raise UserError(f"check {check.text!r}: no row reports metric {check.metric!r} (known: {', '.join(known)})")
        failing = [f"{a} on {rt}: {v:.4g}" for a, rt, v in measured if not check.holds(v)]
        results.append({"check": check.text, "passed": not failing, "detail": "; ".join(failing)})
    return results
