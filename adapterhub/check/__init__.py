"""Compatibility checks of an adapter against a base, from headers only.

>>> from adapterhub.check import check          # doctest: +SKIP
>>> check("./my-adapter", "./base-model").ok    # doctest: +SKIP
"""

from adapterhub.check.rules import ERROR, RULES, WARNING, CheckReport, Finding, RuleResult, check

__all__ = ["ERROR", "RULES", "WARNING", "CheckReport", "Finding", "RuleResult", "check"]
