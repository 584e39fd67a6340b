"""Regular expressions from untrusted adapter configs, matched in bounded time.

PEFT reads ``rank_pattern`` and ``alpha_pattern`` keys as regular expressions:
a module takes the value of the first key for which
``re.match(rf"(.*\\.)?({key})$", module)`` succeeds
(``peft.utils.other.get_pattern_key``). IA3's ``feedforward_modules`` and a
string ``target_modules`` are matched with ``re.fullmatch``. transformers reads
a checkpoint's ``llm_int8_skip_modules`` as regular expressions that match from
the start of a module name up to a module boundary
(``quantizers_utils.should_convert_module``). Both the patterns
and the module names come from the adapter or checkpoint, so a key such as ``(a+)+b`` would
make Python's backtracking engine run for hours.

Here every pattern gets the same answer as ``re`` in bounded time:

1. a key made only of characters, ``.`` and character classes (a module path,
   by far the common case) runs on ``re`` itself: with no repetition and no
   alternation the backtracking is at most ``len(module) * len(key)`` steps;
2. any other pattern runs on a Thompson NFA built from ``re``'s own parse of
   it (steps bounded by ``len(module) * states``, a few thousand states at most);
3. what an NFA cannot express (backreferences, look-around wider than one
   character, atomic groups and possessive repeats, inline flags other than
   ``x`` and ``s``) runs on ``re``
   in a child process with a time limit.

A pattern that is not a valid regular expression, that is too long, or that
does not finish within the time limit raises ``InvalidArtifactError`` naming
the config key.

>>> get_pattern_key(["layers.0.q_proj", "q_proj|v_proj"], "model.layers.3.v_proj")
'q_proj|v_proj'
>>> find_pattern_key(["(a+)+b"], "a" * 50) is None   # instantly
True
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence

from adapterhub import jsonio
from adapterhub.errors import InvalidArtifactError

try:  # Python 3.11+
    from re import _constants as _sre_c
    from re import _parser as _sre_p
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_c  # type: ignore[no-redef]
    import sre_parse as _sre_p  # type: ignore[no-redef]

__all__ = [
    "PatternTimeout", "boundary_match", "find_pattern_key", "fullmatch", "get_pattern_key", "pattern_problem",
    "prefetch", "suffix_match",
]

MAX_PATTERN = 4096  # characters in one key
MAX_STATES = 5000  # NFA states of one pattern (repeats are unrolled)
MAX_STEPS = 4_000_000  # len(string) * states for one NFA run; longer runs go to the timed child
TIMEOUT_S = 2.0  # wall-clock limit of one child run (all strings of one pattern at once)

_FLAT = {"LITERAL", "NOT_LITERAL", "ANY", "IN"}
# Global flags the NFA honours: re.UNICODE (default for str), re.VERBOSE (parse-time only), re.DOTALL.
_NFA_FLAGS = re.UNICODE | re.VERBOSE | re.DOTALL


class PatternTimeout(InvalidArtifactError):
    """A pattern that needed the timed fallback and ran out of time."""


class _Unsupported(Exception):
    """A construct the NFA does not express, or one too large to unroll."""


# --------------------------------------------------------------------------- the NFA

_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict[str, Callable[[str], bool]] = {
    "CATEGORY_DIGIT": str.isdecimal,
    "CATEGORY_NOT_DIGIT": lambda c: not c.isdecimal(),
    "CATEGORY_SPACE": str.isspace,
    "CATEGORY_NOT_SPACE": lambda c: not c.isspace(),
    "CATEGORY_WORD": _is_word,
    "CATEGORY_NOT_WORD": lambda c: not _is_word(c),
}


def _class_pred(items: list) -> Callable[[str], bool]:
    negate = False
    tests: list[Callable[[str], bool]] = []
    for op, av in items:
        name = str(op)
        if name == "NEGATE":
            negate = True
        elif name == "LITERAL":
            tests.append(lambda c, x=chr(av): c == x)
        elif name == "RANGE":
            tests.append(lambda c, lo=av[0], hi=av[1]: lo <= ord(c) <= hi)
        elif name == "CATEGORY" and str(av) in _CATEGORIES:
            tests.append(_CATEGORIES[str(av)])
        else:
            raise _Unsupported(name)
    if negate:
        return lambda c: not any(t(c) for t in tests)
    return lambda c: any(t(c) for t in tests)


class _NFA:
    def __init__(self, parsed: _sre_p.SubPattern) -> None:
        flags = parsed.state.flags
        if flags & ~_NFA_FLAGS:
            raise _Unsupported("flags")
        self.dotall = bool(flags & re.DOTALL)
        self.kind: list[int] = []
        self.arg: list[object] = []
        self.out1: list[int] = []
        self.out2: list[int] = []
        match = self._new(_MATCH, None, -1, -1)
        self.start = self._seq(list(parsed), match)

    def _new(self, kind: int, arg: object, o1: int, o2: int) -> int:
        if len(self.kind) >= MAX_STATES:
            raise _Unsupported("size")
        self.kind.append(kind)
        self.arg.append(arg)
        self.out1.append(o1)
        self.out2.append(o2)
        return len(self.kind) - 1

    def _seq(self, items: list, nxt: int) -> int:
        for item in reversed(items):
            nxt = self._node(item, nxt)
        return nxt

    def _node(self, item: tuple, nxt: int) -> int:
        op, av = item
        name = str(op)
        if name == "LITERAL":
            return self._new(_CHAR, lambda c, x=chr(av): c == x, nxt, -1)
        if name == "NOT_LITERAL":
            return self._new(_CHAR, lambda c, x=chr(av): c != x, nxt, -1)
        if name == "ANY":
            return self._new(_CHAR, (lambda c: True) if self.dotall else (lambda c: c != "\n"), nxt, -1)
        if name == "IN":
            return self._new(_CHAR, _class_pred(av), nxt, -1)
        if name == "BRANCH":
            starts = [self._seq(list(alt), nxt) for alt in av[1]]
            s = starts[-1]
            for alt in reversed(starts[:-1]):
                s = self._new(_SPLIT, None, alt, s)
            return s
        if name == "SUBPATTERN":
            _group, add, dele, sub = av
            if add or dele:
                raise _Unsupported("inline flags")
            return self._seq(list(sub), nxt)
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            return self._repeat(av, nxt)
        if name == "AT" and str(av) in _ASSERTIONS:
            return self._new(_ASSERT, _ASSERTIONS[str(av)], nxt, -1)
        if name in ("ASSERT", "ASSERT_NOT"):
            test = self._lookaround(av)
            if name == "ASSERT_NOT":
                return self._new(_ASSERT, lambda s, pos, t=test: not t(s, pos), nxt, -1)
            return self._new(_ASSERT, test, nxt, -1)
        raise _Unsupported(name)

    def _char_test(self, name: str, av: object) -> Callable[[str], bool]:
        if name == "LITERAL":
            return lambda c, x=chr(av): c == x  # type: ignore[arg-type, misc]
        if name == "NOT_LITERAL":
            return lambda c, x=chr(av): c != x  # type: ignore[arg-type, misc]
        if name == "ANY":
            return (lambda c: True) if self.dotall else (lambda c: c != "\n")
        if name == "IN":
            return _class_pred(av)  # type: ignore[arg-type]
        raise _Unsupported(name)

    def _lookaround(self, av: tuple) -> Callable[[str, int], bool]:
        r"""A look-ahead or look-behind over one character or a position (``(?<=\.)``,
        ``(?=\.|$)``), checked in place; wider ones stay with ``re``."""
        direction, sub = av
        items = list(sub)
        alts = [list(a) for a in items[0][1][1]] if len(items) == 1 and str(items[0][0]) == "BRANCH" else [items]
        tests: list[Callable[[str, int], bool]] = []
        for alt in alts:
            if len(alt) != 1:
                raise _Unsupported("look-around")
            op, arg = alt[0]
            if str(op) == "AT" and str(arg) in _ASSERTIONS:  # zero width: the same either way
                tests.append(_ASSERTIONS[str(arg)])
            elif direction == 1:
                tests.append(lambda s, pos, c=self._char_test(str(op), arg): pos < len(s) and c(s[pos]))
            else:
                tests.append(lambda s, pos, c=self._char_test(str(op), arg): pos > 0 and c(s[pos - 1]))
        return lambda s, pos: any(t(s, pos) for t in tests)

    def _repeat(self, av: tuple, nxt: int) -> int:
        lo, hi, sub = av
        items = list(sub)
        if hi == _sre_c.MAXREPEAT:
            loop = self._new(_SPLIT, None, -1, nxt)
            self.out1[loop] = self._seq(items, loop)
            cur = loop
        else:
            if hi - lo > MAX_STATES:
                raise _Unsupported("size")
            cur = nxt
            for _ in range(hi - lo):
                cur = self._new(_SPLIT, None, self._seq(items, cur), nxt)
        if lo > MAX_STATES:
            raise _Unsupported("size")
        for _ in range(lo):
            cur = self._seq(items, cur)
        return cur

    def run(self, s: str, whole: bool) -> bool:
        """``re.match`` (``whole=False``) or ``re.fullmatch`` of the pattern on ``s``."""
        kind, arg, out1 = self.kind, self.arg, self.out1
        current = self._closure([self.start], s, 0)
        n = len(s)
        for i in range(n):
            if not whole and any(kind[st] == _MATCH for st in current):
                return True
            ch = s[i]
            nxt = [out1[st] for st in current if kind[st] == _CHAR and arg[st](ch)]  # type: ignore[operator]
            if not nxt:
                return False
            current = self._closure(nxt, s, i + 1)
        return any(kind[st] == _MATCH for st in current)

    def _closure(self, starts: list[int], s: str, pos: int) -> list[int]:
        kind, arg, out1, out2 = self.kind, self.arg, self.out1, self.out2
        seen: set[int] = set()
        found: list[int] = []
        stack = list(reversed(starts))
        while stack:
            st = stack.pop()
            if st in seen:
                continue
            seen.add(st)
            k = kind[st]
            if k == _SPLIT:
                stack.append(out2[st])
                stack.append(out1[st])
            elif k == _ASSERT:
                if arg[st](s, pos):  # type: ignore[operator]
                    stack.append(out1[st])
            else:
                found.append(st)
        return found


def _boundary(s: str, pos: int) -> bool:
    before = pos > 0 and _is_word(s[pos - 1])
    after = pos < len(s) and _is_word(s[pos])
    return before != after


_ASSERTIONS: dict[str, Callable[[str, int], bool]] = {
    "AT_BEGINNING": lambda s, pos: pos == 0,
    "AT_BEGINNING_STRING": lambda s, pos: pos == 0,
    "AT_END": lambda s, pos: pos == len(s) or (pos == len(s) - 1 and s[pos] == "\n"),
    "AT_END_STRING": lambda s, pos: pos == len(s),
    "AT_BOUNDARY": _boundary,
    "AT_NON_BOUNDARY": lambda s, pos: bool(s) and not _boundary(s, pos),
}


# --------------------------------------------------------------------------- one compiled pattern


class _Pattern:
    """One pattern, compiled for the fastest engine that gives ``re``'s answer in bounded time."""

    def __init__(self, pattern: str, source: str, what: str) -> None:
        self.source, self.what = source, what
        if len(source) > MAX_PATTERN:
            raise InvalidArtifactError(f"{what}: pattern of {len(source)} characters (limit {MAX_PATTERN})")
        try:
            self.regex = re.compile(pattern)
            parsed = _sre_p.parse(pattern)
        except re.error as e:  # e.msg: the position would count the (.*\.)? PEFT puts around the key
            raise InvalidArtifactError(f"{what}: {source!r} is not a valid regular expression ({e.msg})") from None
        except (RecursionError, OverflowError) as e:
            raise InvalidArtifactError(f"{what}: {source!r} is not a usable regular expression ({e})") from None
        self.pattern = pattern
        self.nfa: _NFA | None = None
        self.flat = False
        self.timed: dict[tuple[bool, str], bool] = {}
        try:
            self.nfa = _NFA(parsed)
        except (_Unsupported, RecursionError):
            self.nfa = None

    def match(self, s: str, whole: bool) -> bool:
        if self.flat:
            return bool(self.regex.fullmatch(s) if whole else self.regex.match(s))
        if self.nfa is not None and len(s) * len(self.nfa.kind) <= MAX_STEPS:
            return self.nfa.run(s, whole)
        return self.timed_many([s], whole)[0]

    def timed_many(self, strings: Sequence[str], whole: bool) -> list[bool]:
        """``re`` itself, in a child process that is killed after TIMEOUT_S."""
        todo = [s for s in dict.fromkeys(strings) if (whole, s) not in self.timed]
        if todo:
            for s, hit in zip(todo, _timed_re(self.pattern, todo, whole, self.source, self.what), strict=True):
                self.timed[(whole, s)] = hit
        return [self.timed[(whole, s)] for s in strings]


_CHILD = (
    "import json, re, sys\n"
    "d = json.load(sys.stdin)\n"
    "r = re.compile(d['p'])\n"
    "f = r.fullmatch if d['whole'] else r.match\n"
    "json.dump([bool(f(s)) for s in d['s']], sys.stdout)\n"
)


def _timed_re(pattern: str, strings: list[str], whole: bool, source: str, what: str) -> list[bool]:
    data = json.dumps({"p": pattern, "s": strings, "whole": whole})
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _CHILD],
            input=data,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise PatternTimeout(
            f"{what}: {source!r} did not finish matching within {TIMEOUT_S:g} s "
            "(a regular expression with catastrophic backtracking?)",
            hint="use plain module names or simple patterns in rank_pattern/alpha_pattern",
        ) from None
    if done.returncode != 0:
        raise InvalidArtifactError(f"{what}: {source!r} could not be matched ({done.stderr.strip()[-200:]})")
    return [bool(x) for x in jsonio.loads(done.stdout, what=f"{what}: matcher output")]


def _is_flat(key: str) -> bool:
    """True when ``key`` alone is characters, ``.`` and classes: no repetition, alternation or group."""
    try:
        parsed = _sre_p.parse(key)
    except (re.error, RecursionError, OverflowError):
        return False
    return parsed.state.flags & ~re.UNICODE == 0 and all(str(op) in _FLAT for op, _ in parsed)


@functools.lru_cache(maxsize=512)
def _suffix_pattern(key: str, what: str) -> _Pattern:
    p = _Pattern(rf"(.*\.)?({key})$", key, what)
    # (.*\.)?(K)$ with a flat K backtracks at most len(module) * len(K) steps in re itself.
    p.flat = len(key) <= MAX_PATTERN and _is_flat(key)
    return p


#: transformers' module boundary after a skip pattern: just after a ``.``, or before one or the end.
BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


@functools.lru_cache(maxsize=256)
def _boundary_pattern(key: str, what: str) -> _Pattern:
    return _Pattern(rf"(?:{key}){BOUNDARY}", key, what)


@functools.lru_cache(maxsize=256)
def _whole_pattern(pattern: str, what: str) -> _Pattern:
    p = _Pattern(pattern, pattern, what)
    p.flat = _is_flat(pattern)
    return p


# --------------------------------------------------------------------------- the public face


def suffix_match(key: str, module: str, what: str = "rank_pattern") -> bool:
    """PEFT's test of one pattern key: ``re.match(rf"(.*\\.)?({key})$", module)``."""
    return _suffix_pattern(str(key), what).match(module, whole=False)


def find_pattern_key(keys: Iterable[str], module: str, what: str = "rank_pattern") -> str | None:
    """The first key that matches ``module`` the way PEFT matches it, or None."""
    for key in keys:
        if suffix_match(key, module, what):
            return key
    return None


def get_pattern_key(keys: Iterable[str], module: str, what: str = "rank_pattern") -> str:
    """``peft.utils.other.get_pattern_key``: the first matching key, else ``module`` itself."""
    found = find_pattern_key(keys, module, what)
    return module if found is None else found


def pattern_problem(pattern: str, whole: bool = False) -> str | None:
    """Why ``pattern`` cannot be used (invalid or too long), or None."""
    try:
        (_whole_pattern(str(pattern), "") if whole else _suffix_pattern(str(pattern), ""))
    except InvalidArtifactError as e:
        return str(e).removeprefix(": ")
    return None


def boundary_match(key: str, module: str, what: str = "llm_int8_skip_modules") -> bool:
    """transformers' regex test of one skip pattern: ``re.match(rf"(?:{key})" + BOUNDARY, module)``.

    ``layers.1`` names ``layers.1.mlp`` but not ``layers.11.mlp``; ``mlp.gate``
    names ``mlp.gate`` but not ``mlp.gate_proj``. (transformers also skips a
    module whose name ends with the key, a plain string test.)
    """
    return _boundary_pattern(str(key), what).match(module, whole=False)


def fullmatch(pattern: str, s: str, what: str = "target_modules") -> bool:
    """``re.fullmatch(pattern, s)`` in bounded time."""
    return _whole_pattern(str(pattern), what).match(s, whole=True)


def prefetch(keys: Iterable[str], modules: Sequence[str], what: str = "rank_pattern") -> None:
    """Match the keys that need the timed child against all ``modules`` in one run per key."""
    for key in keys:
        p = _suffix_pattern(str(key), what)
        if not p.flat and (p.nfa is None or any(len(m) * len(p.nfa.kind) > MAX_STEPS for m in modules)):
            p.timed_many(list(modules), whole=False)
