"""Compatibility checks of an adapter against a base, from headers only.

:func:`check` runs the rules of :data:`RULES` and returns a :class:`CheckReport`:
the inputs (:mod:`.inputs`), the merge-plan binding (:mod:`.plan`), the rules
(:mod:`.rules`), the one scan of tensor data (:mod:`.scan`), the report
(:mod:`.report`) and the table of PEFT config fields (:mod:`.peft_fields`).

>>> from adapterhub.check import check          # doctest: +SKIP
>>> check("./my-adapter", "./base-model").ok    # doctest: +SKIP
"""

from adapterhub.check.report import ERROR, INFO, RULES, WARNING, CheckReport, Finding, RuleResult
from adapterhub.check.rules import check

__all__ = ["ERROR", "INFO", "RULES", "WARNING", "CheckReport", "Finding", "RuleResult", "check"]
