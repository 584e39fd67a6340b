"""The sequence every conversion service runs, in one place.

A service (``merge``, ``quantize``, ``extract``, ``to_gguf``, ``to_mlx``, ...)
resolves its inputs, then hands ``run`` the conversion as a callable. ``run``
checks where the output goes, applies the trust policy to the inputs, runs
the conversion into OUT or into a staging directory of the registry, and with
``push`` stores the output with its lineage (the inputs' digests and the
recipe) and signs it when a key is set.

Every service takes the same keyword arguments for where the output goes
(``Delivery``): ``out``, ``push``, ``force``, ``tags``, ``description``,
``registry``, ``progress``, ``require_signature`` and ``sign``.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from adapterhub import __version__, config
from adapterhub.errors import UsageError
from adapterhub.fsutil import check_output_dir
from adapterhub.manifest import FileEntry, Manifest, hash_file
from adapterhub.sources import Source

if TYPE_CHECKING:
    from adapterhub.registry import PushResult, Registry

#: input name -> (the resolved input, its relation in the lineage: "base", "converted_from", ...)
Inputs = dict[str, tuple[Source, str]]


class DeliveryArgs(TypedDict, total=False):
    """The keyword arguments every conversion service takes (see ``Delivery``)."""

    out: str | os.PathLike | None
    push: str | None
    force: bool
    tags: tuple[str, ...]
    description: str | None
    registry: Registry | None
    progress: Any
    require_signature: bool
    sign: bool | None


@dataclass(frozen=True)
class Delivery:
    """Where a conversion's output goes, and how it is stored and trusted.

    ``out`` is the directory (or file) written, ``push`` the name it is stored
    under; at least one of them. ``force`` lets OUT be replaced; ``tags`` and
    ``description`` go with the pushed artifact; ``require_signature`` refuses
    unsigned inputs; ``sign`` (None: when a default key is set) signs the output.
    """

    out: Path | None = None
    push: str | None = None
    force: bool = False
    tags: tuple[str, ...] = ()
    description: str | None = None
    registry: Registry | None = None
    progress: Any = None
    require_signature: bool = False
    sign: bool | None = None

    @classmethod
    def of(cls, function: str, kw: Mapping[str, Any]) -> Delivery:
        """The ``DeliveryArgs`` a service was called with; an unknown keyword is a TypeError, as Python gives."""
        known = {f.name for f in fields(cls)}
        for name in kw:
            if name not in known:
                raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")
        out = kw.get("out")
        return cls(**{**kw, "out": Path(out) if out else None})


@dataclass
class ConversionResult:
    operation: str
    inputs: dict[str, Source]
    out: Path | None  # the directory written (None when only pushed)
    report: Any  # the converter's report (has to_dict())
    pushed: PushResult | None
    recipe: dict[str, Any]
    seconds: float
    signed: dict[str, Any] | None = None  # signature + provenance blobs, or why skipped

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "out": str(self.out) if self.out else None,
            "pushed": self.pushed.to_dict() if self.pushed else None,
            "report": self.report.to_dict() if hasattr(self.report, "to_dict") else self.report,
            "recipe": self.recipe,
            "seconds": round(self.seconds, 3),
            "signed": self.signed,
        }


def card_name(src: Source | None) -> str | None:
    """How a model card should name an input: a Hub id or a registry ref, never a local path."""
    if src is None:
        return None
    return src.hub_id or src.ref


def digest_of(src: Source) -> str:
    """The input's artifact digest: the registry's, or hashed from its files."""
    if src.digest:
        return src.digest
    return Manifest.from_entries(
        FileEntry(rel, os.stat(p).st_size, hash_file(p)) for rel, p in sorted(src.files.items())
    ).digest


def check_target(push: str | None, out: Path | None, description: str | None = None) -> None:
    """OUT, NAME or both (then OUT is written and pushed); a description needs NAME."""
    if push is None and out is None:
        raise UsageError("say where the output goes: -o OUT, --push NAME[:VERSION], or both")
    if description is not None and push is None:
        raise UsageError("--description describes the pushed artifact: it needs --push NAME[:VERSION]")
    if push is not None:
        from adapterhub.refs import parse_target

        parse_target(push)  # fail on a bad name before any work


def check_output(out: str | os.PathLike, inputs: Iterable[Source], registry: Registry | None = None) -> None:
    """Refuse an OUT that is, contains or lies inside an input (directory or file) or the registry home.

    Conversions that write a directory call this before any work (``run``
    does it for every service).
    """
    paths: list[str | os.PathLike] = []
    for src in inputs:
        if src.root is not None:
            paths.append(src.root)
        paths.extend(src.files.values())
    home = registry.home if registry is not None else config.home()
    check_output_dir(out, paths, home=home)


def _recipe(operation: str, options: dict[str, Any], inputs: dict[str, Source], report: Any) -> dict[str, Any]:
    return {
        "tool": f"adapterhub {__version__}",
        "operation": operation,
        "options": options,
        "inputs": {k: v.to_dict() for k, v in inputs.items()},
        "python": platform.python_version(),
        "report": report.to_dict() if hasattr(report, "to_dict") else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run(
    operation: str,
    inputs: Inputs,
    convert: Callable[[Path, bool], Any],
    d: Delivery,
    options: dict[str, Any],
) -> ConversionResult:
    """Check the target and the inputs, run ``convert(target, hash_outputs)``, push and sign.

    Without OUT the conversion writes into a staging directory of the registry,
    which is pushed and then removed; ``hash_outputs`` is then True, so that the
    converter hashes its files as it writes them and the push need not read them.
    """
    t0 = time.perf_counter()
    sources = {k: src for k, (src, _) in inputs.items()}
    check_target(d.push, d.out, d.description)
    reg = d.registry
    if d.out is not None:
        check_output(d.out, sources.values(), registry=reg)
    if d.push is not None and reg is None:
        from adapterhub.registry import Registry

        reg = Registry()
    # Trust policy: unsigned or untrusted inputs fail before any work.
    from adapterhub.trust.gate import check_inputs

    check_inputs(sources, reg, d.require_signature)
    signed = None
    # Inputs outside the registry are hashed for the lineage while the
    # conversion runs (hashlib releases the GIL; page-cache reads are cheap).
    digests: dict[str, Future[str]] = {}
    pool = ThreadPoolExecutor(1) if d.push is not None else None
    tmp_root: Path | None = None
    try:
        if pool is not None:
            for k, src in sources.items():
                digests[k] = pool.submit(digest_of, src)
        if d.out is None:
            assert reg is not None
            tmp_root = reg.staging_dir("convert")  # fsck and gc find it if this process is killed
            target = tmp_root / "out"
        else:
            target = d.out
        report = convert(target, tmp_root is not None)
        recipe = _recipe(operation, options, sources, report)
        pushed = None
        if d.push is not None:
            assert reg is not None
            derived = [(digests[k].result(), relation) for k, (_, relation) in inputs.items()]
            recipe["inputs"] = {k: {**v.to_dict(), "digest": digests[k].result()} for k, v in sources.items()}
            # Weight files written into our own staging dir were hashed as they
            # were written: they enter the store by hard link, unread. (Never
            # for -o OUT: a link would tie the store to files the user may edit.)
            verified = getattr(report, "file_sha256", None) if tmp_root is not None else None
            pushed = reg.push(
                target, d.push, tags=d.tags, description=d.description, derived_from=derived,
                recipe=recipe, progress=d.progress, verified=verified or None,
            )
            # Sign the output's files and its provenance with the default key.
            from adapterhub.trust.gate import sign_output

            signed = sign_output(reg, pushed.ref, d.sign)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return ConversionResult(operation, sources, d.out, report, pushed, recipe, time.perf_counter() - t0, signed)
