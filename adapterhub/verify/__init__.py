"""Numerical verification: does a converted artifact behave like the base with
the adapter applied (PEFT, unmerged)?

>>> from adapterhub.verify import verify                     # doctest: +SKIP
>>> verify("team/merged:1", "team/lora:1", "base").verdict    # doctest: +SKIP
'PASS'
"""

from __future__ import annotations

from typing import Any

__all__ = ["verify"]


def __getattr__(name: str) -> Any:
    # Lazy: verification imports torch; `adapterhub.verify.metrics` must not.
    if name == "verify":
        from adapterhub.verify.run import verify

        return verify
    raise AttributeError(name)
