"""Compatibility checks of an adapter against a base, from headers only.

:func:`check` runs the rules of :data:`RULES` and returns a :class:`CheckReport`:
the inputs (:mod:`.inputs`), the merge-plan binding (:mod:`.plan`), the rules
(:mod:`.rules`), the one scan of tensor data (:mod:`.scan`), the report
(:mod:`.report`), the table of PEFT config fields (:mod:`.peft_fields`) and,
with ``targets``, the rules of serving engines (:mod:`.targets`, data in
:mod:`.targets_table`).

>>> from adapterhub.check import check          # doctest: +SKIP
>>> check("./my-adapter", "./base-model").ok    # doctest: +SKIP
"""

from adapterhub.check.report import ERROR, INFO, RULES, WARNING, CheckReport, Finding, RuleResult
from adapterhub.check.rules import check
from adapterhub.check.targets_table import TARGET_NAMES, TARGETS

__all__ = ["ERROR", "INFO", "RULES", "TARGETS", "TARGET_NAMES", "WARNING", "CheckReport", "Finding", "RuleResult", "check"]
