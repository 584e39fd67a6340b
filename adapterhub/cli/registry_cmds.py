"""push, pull, ls, show, search, tag, untag."""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import sys
from pathlib import Path

import click

from adapterhub.cli._common import prompt_passphrase, registry
from adapterhub.cli._output import Output, echo, human_size, human_sizes, json_option, quiet_option, table_columns


def _version_rows(versions):
    return [
        (
            f"{v.name}:{v.version}",
            ",".join(v.tags) or None,
            v.kind,
            v.method,
            v.rank,
            v.quant,
            v.base_model,
            human_size(v.size),
            v.created_at.replace("T", " ").rstrip("Z"),
        )
        for v in versions
    ]


_VERSION_HEADERS = ("ref", "tags", "kind", "method", "rank", "quant", "base model", "size", "created")


@click.command(name="push")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("target", required=False)
@click.option("--tag", "-t", "tags", multiple=True, help="Also point this tag at the version (repeatable).")
@click.option("--description", "-d", help="A line describing the adapter (searchable).")
@click.option("--sign", "sign", is_flag=True, help="Sign the pushed files (OpenSSF model-signing) with the default key or --key.")
@click.option("--key", "key_name", metavar="NAME", help="With --sign: the signing key.")
@click.option("--remote", "remote", metavar="NAME", help="Push the registry artifact PATH (a ref) to this remote.")
@json_option
@quiet_option
def registry_push(path: Path, target: str | None, tags: tuple[str, ...], description: str | None, sign: bool, key_name: str | None, remote: str | None, json_: bool, quiet: bool):
    """Store an adapter or model directory (or file) in the registry.

    TARGET is NAME or NAME:VERSION. Without a version the next integer is
    used (1, 2, 3 ...); semver strings such as 1.2.0 work too. Versions are
    immutable; pushing identical content again is a no-op that reports the
    existing version. `latest` moves to every new version.

    \b
    Examples:
      adapterhub push ./out/qa-lora team/qa-lora
      adapterhub push ./out/qa-lora team/qa-lora:1.0.0 --tag prod -d "QA on support tickets"
      adapterhub push ./out/qa-lora team/qa-lora --sign
      adapterhub push team/qa-lora:3 --remote team        # to a remote (`adapterhub remote`)
      adapterhub push team/qa-lora:3 oci://127.0.0.1:5000/ml/qa-lora:3
      adapterhub push team/qa-lora:3 hf://my-org/qa-lora

    With --remote NAME, or an oci:// or hf:// TARGET, PATH is a ref of the
    local registry and its files, metadata, lineage and signatures are
    uploaded; blobs the remote already has are not sent again.
    """
    from adapterhub.registry.remotes import is_url

    if remote or is_url(target):
        if sign or description:
            raise click.UsageError("--sign and --description are for a local push; sign or describe REF first, then push it to the remote")
        from adapterhub.cli.remote_cmds import push_to_remote

        return push_to_remote(str(path), target, remote, tags, json_, quiet)
    if target is None:
        raise click.UsageError("missing TARGET: NAME[:VERSION], an oci:// or hf:// URL, or --remote NAME")
    out = Output(json_, quiet)
    signed = None
    with registry() as reg:
        if sign:
            from adapterhub.trust.signing import push_signed

            res, signed = push_signed(reg, path, target, key_name=key_name, prompt=prompt_passphrase,
                                      tags=tags, description=description, progress=out.progress)
        else:
            res = reg.push(path, target, tags=tags, description=description, progress=out.progress)
    for w in res.inspection.warnings:
        out.warn(w)

    def human():
        if quiet:
            echo(res.ref)
            return
        if res.created:
            echo(
                f"pushed {res.ref}  {res.digest[:19]}  {res.file_count} files, {human_size(res.size)}"
                f" ({human_size(res.bytes_written)} new)"
            )
        else:
            echo(f"unchanged: {res.ref} already holds this content ({res.digest[:19]})")
        if res.tags:
            echo(f"tags: {', '.join(res.tags)}")
        if signed:
            echo(f"signed with key {signed.key_name} ({signed.key_id[:16]})")

    out.result({**res.to_dict(), "signature": signed.to_dict() if signed else None}, human)


@click.command(name="pull")
@click.argument("ref")
@click.argument("dest", type=click.Path(path_type=Path), required=False)
@click.option("--force", "-f", is_flag=True, help="Write into DEST even if it is not empty.")
@click.option("--require-signature", is_flag=True, help="Fail unless REF has a valid signature by a trusted key (as the policy rule does).")
@click.option("--require-provenance", is_flag=True, help="Fail unless a merged or quantized REF has a verified provenance chain.")
@click.option("--signature-file", default="model.sig", show_default=True, metavar="NAME", help="Where in DEST to write REF's signature.")
@click.option("--no-signature-file", is_flag=True, help="Do not write the signature into DEST.")
@click.option("--link", is_flag=True,
              help="Link instead of copying: reflinks where the filesystem can, else hard links to the read-only "
              "blobs (never edit those in place). O(files), no data copied.")
@click.option("--remote", "remote", metavar="NAME", help="Import REF from this remote into the local registry.")
@click.option("--name", "local_name", metavar="NAME[:VERSION]", help="With a remote: the local name (and version) to import under.")
@json_option
@quiet_option
def registry_pull(ref: str, dest: Path | None, force: bool, require_signature: bool, require_provenance: bool,
                  signature_file: str, no_signature_file: bool, remote: str | None, local_name: str | None, json_: bool, quiet: bool,
                  link: bool = False):
    """Write the files of REF into DEST, byte for byte.

    Every byte is re-hashed on the way out; a mismatch is an error that names
    the file, and nothing is left in DEST. DEST must be absent or empty
    unless --force is given.

    \b
    Examples:
      adapterhub pull team/qa-lora ./qa-lora            # latest
      adapterhub pull team/qa-lora:3 ./qa-lora-v3
      adapterhub pull team/qa-lora@prod ./deploy --force
      adapterhub pull team/qa-lora ./qa-lora --require-signature
      adapterhub pull team/qa-lora:3 --remote team            # import from a remote
      adapterhub pull oci://127.0.0.1:5000/ml/qa-lora:3 ./qa-lora
      adapterhub pull hf://my-org/qa-lora --name team/qa-lora

    With --link, DEST is made without copying data: reflinks (copy-on-write)
    where the filesystem supports them, else hard links to the registry's
    read-only blobs. Do not edit hard-linked files in place (copy them first):
    that would change the registry's copy, which `adapterhub fsck` then
    reports as corrupt.

    A signed REF gets its signature as DEST/model.sig, which `model_signing
    verify key DEST --signature DEST/model.sig --public_key KEY.pub` accepts.
    A trust policy (`adapterhub policy`) or --require-signature makes the pull
    fail closed (exit 8) on an unsigned or untrusted REF, leaving nothing.

    With --remote NAME, or an oci:// or hf:// REF, the artifact is first
    imported into the local registry (every blob checked against its digest,
    a broken download resumed on the next run); DEST is then optional. The
    trust policy, --require-signature and --require-provenance apply to the
    import too: a refused artifact is not imported.
    """
    from adapterhub.trust.gate import pull
    from adapterhub.registry.remotes import is_url

    imported = None
    if remote or is_url(ref):
        from adapterhub.cli.remote_cmds import pull_from_remote

        imported = pull_from_remote(ref, remote, local_name, require_signature, json_, quiet, final=dest is None,
                                    require_provenance=require_provenance)
        if dest is None:
            return
        ref = imported["ref"]
    elif dest is None:
        raise click.UsageError("missing DEST (a local pull writes files into a directory)")
    out = Output(json_, quiet)
    with registry() as reg:
        res, trust_outcome = pull(
            reg, ref, dest, force=force, progress=out.progress, require_signature=require_signature,
            require_provenance=require_provenance, signature_file=None if no_signature_file else signature_file,
            link=link,
        )
    out.result(
        {**res.to_dict(), "trust": trust_outcome, **({"imported": imported} if imported else {})},
        lambda: echo(str(res.dest) if quiet else f"pulled {res.ref} into {res.dest} ({len(res.files)} files, {human_size(res.size)})"),
    )


# Listing everything in a registry of 100,000 artifacts would take seconds to
# print: ls and search show a page unless --all (issue 14).
PAGE = 1000
JSON_CHUNK = 1000


def _print_rows(out: Output, rows, page: int | None, what: str, empty: str) -> None:
    """Print listing rows (``registry.search.ROW_FIELDS``) as a table, refs (--quiet) or JSON.

    With a page, one row beyond it is read to tell whether there are more
    (then a warning says so). Without one (``--all``) the rows are streamed
    from the query to the output: refs and JSON never hold them all, and the
    table holds only its cells (its column widths need every row).
    """
    more = False
    if page is not None:
        head = list(itertools.islice(rows, page))
        more = next(rows, None) is not None
        rows = iter(head)
    with _no_cyclic_gc():
        _print_rows_now(out, rows, empty)
    if more:
        out.warn(f"showing the first {page} {what}; --all shows every one, --limit N another number")


@contextlib.contextmanager
def _no_cyclic_gc():
    """The cyclic collector off meanwhile: listing rows and cells make no reference
    cycles, and the collector would only walk the growing list of 100,000 cells
    again and again."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _print_rows_now(out: Output, rows, empty: str) -> None:
    if out.json:
        _print_json(rows)
    elif out.quiet:
        lines = [f"{r[0]}:{r[1]}" for r in rows]
        if lines:
            echo("\n".join(lines))
    else:
        rows = list(rows)
        if rows:
            table_columns(_VERSION_HEADERS, _cell_columns(rows))
        else:
            echo(empty, err=True)


def _cell_columns(rows) -> list[list[str]]:
    """The table's columns, as :func:`_version_rows` and ``table`` make them from VersionInfos.

    Column by column (``zip``, ``map`` and one comprehension per column) rather
    than row by row: a tenth of the Python work per version of ``ls --all``.
    """
    (names, versions, _, created, _, kinds, methods, bases, ranks, quants, sizes, _, tags) = zip(*rows)
    return [
        list(map(":".join, zip(names, versions))),
        ["-" if t is None else t if "," not in t else ",".join(sorted(t.split(","))) for t in tags],
        list(map(str, kinds)),
        _dashed(methods),
        ["-" if x is None else str(x) for x in ranks],
        _dashed(quants),
        _dashed(bases),
        human_sizes(sizes),
        [c.replace("T", " ").rstrip("Z") for c in created],
    ]


def _dashed(col) -> list[str]:
    return ["-" if x is None else x for x in col]


def _print_json(rows) -> None:
    """The JSON list that ``json.dumps`` would write, a chunk of rows at a time (indented on a terminal)."""
    from adapterhub.registry.search import row_dict

    if sys.stdout.isatty():
        click.echo(json.dumps([row_dict(r) for r in rows], indent=2))
        return
    write = sys.stdout.write
    sep = "["
    while chunk := list(itertools.islice(rows, JSON_CHUNK)):
        write(sep + ", ".join(_json_objects(chunk)))
        sep = ", "
    write("[]\n" if sep == "[" else "]\n")
    sys.stdout.flush()


# row_dict's keys in its order, each with the row field it takes (tags and ref are made).
_JSON_FIELDS = (("ref", -1), ("name", 0), ("version", 1), ("digest", 2), ("tags", -2), ("created_at", 3),
                ("description", 4), ("kind", 5), ("method", 6), ("base_model", 7), ("rank", 8), ("quant", 9),
                ("size", 10), ("file_count", 11))
_JSON_TEMPLATE = "{" + ", ".join(f'"{k}": %s' for k, _ in _JSON_FIELDS) + "}"


def _json_objects(rows) -> list[str]:
    """``json.dumps(row_dict(r))`` of each row, encoded column by column with json's C string encoder."""
    cols = list(zip(*rows))
    names, versions = cols[0], cols[1]
    values = []
    for _, i in _JSON_FIELDS:
        if i == -1:
            values.append(list(map(_encode_str, map(":".join, zip(names, versions)))))
        elif i == -2:
            values.append(["[]" if t is None else _json_tags(t) for t in cols[12]])
        else:
            values.append(_json_values(cols[i]))
    return list(map(_JSON_TEMPLATE.__mod__, zip(*values)))


_encode_str = json.encoder.encode_basestring_ascii  # what json.dumps uses for str (ensure_ascii)
_int_repr = int.__repr__  # what json.dumps writes for an int


def _json_values(col) -> list[str]:
    """Each value as json.dumps writes it: a column of only str or only int in one C-level map."""
    first = col[0].__class__ if col else None
    if first is str or first is int:
        try:
            return list(map(_encode_str if first is str else _int_repr, col))
        except TypeError:  # a None or another type further down: value by value
            pass
    return [
        _encode_str(x) if x.__class__ is str else "null" if x is None
        else _int_repr(x) if x.__class__ is int else json.dumps(x)
        for x in col
    ]


def _json_tags(t: str | None) -> str:
    if not t:
        return "[]"
    if "," in t:
        return json.dumps(sorted(t.split(",")))
    return "[" + _encode_str(t) + "]"


@click.command(name="ls")
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help=f"List every version (without NAME the list stops at {PAGE}).")
@click.option("--limit", type=click.IntRange(min=1), help="List at most this many versions.")
@json_option
@quiet_option
def registry_ls(name: str | None, json_: bool, quiet: bool, all_: bool = False, limit: int | None = None):
    """List names and versions in the registry.

    Without NAME, the first 1000 versions (by name) are listed, and a
    warning says when there are more: --all lists every one.

    \b
    Examples:
      adapterhub ls
      adapterhub ls team/qa-lora --json
      adapterhub ls --all --quiet
    """
    out = Output(json_, quiet)
    if limit is None and name is None and not all_:
        limit = PAGE
    empty = "the registry is empty: `adapterhub push PATH NAME` adds an adapter"
    with registry() as reg:
        if name is None and limit is None and not (json_ or quiet):
            _print_table_all(reg, empty)
            return
        rows = reg.ls_rows(name, limit=None if limit is None else limit + 1, brief=not json_)
        _print_rows(out, rows, limit, "versions", empty)


def _print_table_all(reg, empty: str) -> None:
    """``ls --all``'s table from ``Registry.ls_table``'s columns: the same bytes as the row path."""
    with _no_cyclic_gc():
        columns = reg.ls_table()
        if not columns[0]:
            echo(empty, err=True)
            return
        columns[7] = human_sizes(columns[7])
        table_columns(_VERSION_HEADERS, columns)


@click.command(name="search")
@click.argument("words", nargs=-1)
@click.option("--base", help="Base model name or part of it (case-insensitive).")
@click.option("--method", help="lora, dora, ia3, adalora, loha, lokr, vera, oft, prompt_tuning, ...")
@click.option("--rank", type=int, help="Exact rank r.")
@click.option("--min-rank", type=int, help="Rank at least this.")
@click.option("--max-rank", type=int, help="Rank at most this.")
@click.option("--quant", help="Quantization: nf4, fp4, int8, q4_k_m, ...")
@click.option("--kind", type=click.Choice(["adapter", "merged", "quantized", "gguf", "checkpoint"]))
@click.option("--derived-from", "derived_from", metavar="REF", help="Only artifacts made from REF (merged, quantized, ...).")
@click.option("--limit", type=int, help=f"Show at most this many results (default {PAGE}).")
@click.option("--all", "all_", is_flag=True, help="Show every result.")
@click.option("--remote", "remote", metavar="NAME|URL", help="Search what a remote holds (refreshes its local cache).")
@click.option("--cached", is_flag=True, help="With --remote: use the cached listing, no network.")
@click.option("--name", "names", multiple=True, metavar="NAME",
              help="With --remote: list these artifacts' tags instead of the registry's catalog (GHCR and Docker Hub have none).")
@click.option("--verified", is_flag=True, help="Only versions whose newest numerical verification (adapterhub verify) passed.")
@json_option
@quiet_option
def registry_search(words, base, method, rank, min_rank, max_rank, quant, kind, derived_from, limit, remote, cached, names, verified, json_, quiet,
                    all_=False):
    """Find versions by text and metadata.

    WORDS are matched (as word prefixes, all of them) against names,
    descriptions and metadata such as target modules; the options filter on
    indexed fields.

    \b
    Examples:
      adapterhub search support tickets
      adapterhub search --base llama-2-7b --method lora --min-rank 16
      adapterhub search --kind quantized --quant nf4 --json
      adapterhub search --derived-from team/qa-lora:3
      adapterhub search --remote team --method lora
      adapterhub search --kind merged --verified
    """
    text = " ".join(words) or None
    if names and not remote:
        raise click.UsageError("--name goes with --remote")
    if remote:
        from adapterhub.cli.remote_cmds import search_remote_cmd

        return search_remote_cmd(remote, cached, text, json_, quiet, names, base=base, method=method, rank=rank,
                                 min_rank=min_rank, max_rank=max_rank, quant=quant, kind=kind, limit=limit)
    out = Output(json_, quiet)
    page = limit if limit is not None else None if all_ else PAGE
    with registry() as reg:
        rows = reg.search_rows(
            text, base=base, method=method, rank=rank, min_rank=min_rank, max_rank=max_rank,
            quant=quant, kind=kind, derived_from=derived_from, limit=None if page is None else page + 1,
            verified=verified,
        )
        _print_rows(out, rows, page, "matches", "no matches")


@click.command(name="show")
@click.argument("ref")
@click.option("--files", "show_files", is_flag=True, help="List every file with its size and sha256.")
@json_option
def registry_show(ref: str, show_files: bool, json_: bool):
    """Show a version: metadata, tags, files, lineage and signatures.

    \b
    Examples:
      adapterhub show team/qa-lora
      adapterhub show team/qa-lora:2 --files
      adapterhub show team/qa-lora@prod --json | jq .inspection.details
    """
    out = Output(json_)
    with registry() as reg:
        info = reg.show(ref)
    out.result(info.to_dict(), lambda: _print_show(info, show_files))


def _print_show(info, show_files: bool) -> None:
    from adapterhub.cli.inspect_cmds import print_inspection

    v = info.version
    echo(f"{v.name}:{v.version}")
    echo(f"  digest:      {v.digest}")
    echo(f"  tags:        {', '.join(v.tags) or '-'}")
    echo(f"  created:     {v.created_at}")
    if v.description:
        echo(f"  description: {v.description}")
    if info.other_versions:
        echo(f"  same as:     {', '.join(info.other_versions)}")
    print_inspection(info.inspection, indent="  ", with_files=False)
    if info.lineage:
        echo("  derived from:")
        for row in info.lineage:
            refs = ", ".join(row["parent_refs"]) or "not in this registry"
            echo(f"    {row['relation']}: {row['parent'][:19]}  ({refs})")
    echo(f"  signatures:  {len(info.signatures) or 'none'}")
    ver = info.verification
    if ver:
        m = ver.get("metrics") or {}
        facts = ", ".join(f"{k} {v:.3g}" for k, v in m.items() if isinstance(v, (int, float)))
        echo(f"  verified:    {ver['verdict']} ({ver['format']} on {ver['device']}, {ver['created_at']}){': ' + facts if facts else ''}")
        same = ver.get("same_recipe")
        if same:
            sm = same.get("metrics") or {}
            sfacts = ", ".join(f"{k} {v:.3g}" for k, v in sm.items() if isinstance(v, (int, float)))
            echo(f"    same-recipe reference: {same.get('verdict')}{': ' + sfacts if sfacts else ''}")
        for f in ver.get("failures") or []:
            echo(f"    {f}")
    echo(f"  files:       {len(info.files)} ({human_size(sum(f.size for f in info.files))})")
    if show_files:
        for f in info.files:
            echo(f"    {f.sha256}  {human_size(f.size):>10}  {f.path}")


@click.command(name="tag")
@click.argument("ref")
@click.argument("tag")
@json_option
def registry_tag(ref: str, tag: str, json_: bool):
    """Point TAG at the version REF names (tags are mutable; versions are not).

    \b
    Examples:
      adapterhub tag team/qa-lora:3 prod
      adapterhub tag team/qa-lora@latest staging
    """
    out = Output(json_)
    with registry() as reg:
        v = reg.tag(ref, tag)
    out.result(v.to_dict(), lambda: echo(f"{v.name}@{tag} -> {v.name}:{v.version}"))


@click.command(name="untag")
@click.argument("ref")
@json_option
def registry_untag(ref: str, json_: bool):
    """Remove a tag (REF is NAME@TAG). The version itself stays.

    \b
    Example:
      adapterhub untag team/qa-lora@staging
    """
    from adapterhub.refs import Ref

    out = Output(json_)
    r = Ref.parse(ref)
    if r.tag is None or "@" not in ref:
        raise click.UsageError("untag takes NAME@TAG")
    with registry() as reg:
        reg.untag(r.name, r.tag)
    out.result({"removed": f"{r.name}@{r.tag}"}, lambda: echo(f"removed tag {r.name}@{r.tag}"))


@click.command(name="lineage")
@click.argument("ref")
@json_option
def registry_lineage(ref: str, json_: bool):
    """Show what REF was made from (up) and what was made from it (down).

    Conversions that end in the registry record their adapter and base
    digests and the recipe (tool version, operation, options).

    \b
    Examples:
      adapterhub lineage team/qa-lora-merged:1
      adapterhub lineage team/qa-lora:3 --json
    """
    out = Output(json_)
    with registry() as reg:
        tree = reg.lineage(ref)

    def walk(nodes, prefix, arrow):
        for i, n in enumerate(nodes):
            last = i == len(nodes) - 1
            refs = ", ".join(n["refs"]) or "(not in this registry)"
            recipe = n.get("recipe") or {}
            op = f"  [{recipe.get('operation')}]" if recipe.get("operation") else ""
            echo(f"{prefix}{'└─' if last else '├─'}{arrow} {n.get('relation', '')}: {refs}  {n['digest'][:19]}{op}")
            key = "up" if arrow == "↑" else "down"
            walk(n.get(key, []), prefix + ("   " if last else "│  "), arrow)

    def human():
        echo(f"{tree['ref']}  {tree['digest'][:19]}")
        if not tree["up"] and not tree["down"]:
            echo("  no recorded lineage")
        if tree["up"]:
            echo("derived from:")
            walk(tree["up"], "  ", "↑")
        if tree["down"]:
            echo("used by:")
            walk(tree["down"], "  ", "↓")

    out.result(tree, human)
