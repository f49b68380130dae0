"""The recipe-section behaviour shared by the transforms' config dataclasses (calibration,
quantize, prune, slim): built from the recipe's mapping, written back as one."""
from __future__ import annotations

import dataclasses
import difflib
from typing import ClassVar

from compress.errors import UserError


class SectionConfig:
    section: ClassVar[str]  # the recipe key, for error messages

    @classmethod
    def from_dict(cls, values: dict | None):
        """Like ``cls(**values)``, but an unknown key or a value of the wrong type is a one-line error."""
        values = dict(values or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else f" (valid: {', '.join(names)})"
                raise UserError(f"recipe: unknown key '{cls.section}.{key}'{hint}")
        try:
            return cls(**values)
        except TypeError as e:  # e.g. a string where a number is compared
            raise UserError(f"recipe: bad '{cls.section}' section: {e}") from None

    def to_dict(self) -> dict:
        """The recipe section that reproduces this configuration."""
        return dataclasses.asdict(self)
