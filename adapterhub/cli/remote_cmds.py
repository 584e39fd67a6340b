"""remote add, login, logout, ls, rm; and push, pull and search against remotes."""

from __future__ import annotations

import sys

import click

from adapterhub.cli._common import Group
from adapterhub.cli._output import Output, echo, json_option, say, table


def _registry():
    from adapterhub.registry import Registry

    return Registry()


@click.group(name="remote", cls=Group)
def remote_group():
    """Name the OCI registries and Hugging Face Hub orgs you share adapters with.

    Credentials go to $ADAPTERHUB_HOME/credentials.json (mode 0600), never into
    the index. Without stored ones, ADAPTERHUB_REMOTE_USERNAME and
    ADAPTERHUB_REMOTE_PASSWORD (or ADAPTERHUB_REMOTE_TOKEN, or HF_TOKEN for the
    Hub) are used, then Docker's ~/.docker/config.json.

    \b
    Examples:
      echo "$PASSWORD" | adapterhub remote add team oci://registry.example.com/ml --username alice --password-stdin
      adapterhub remote add hub hf://my-org --token-stdin < token.txt
      adapterhub push team/qa-lora:3 --remote team
      adapterhub pull team/qa-lora:3 --remote team
      adapterhub search --remote team --method lora
    """


@remote_group.command(name="add")
@click.argument("name")
@click.argument("url")
@click.option("--username", "-u", help="User name for the registry (with --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--token-stdin", is_flag=True, help="Read a token from stdin (Hub token, or a registry bearer token).")
@click.option("--endpoint", help="hf:// only: the URL of a self-hosted Hub.")
@click.option("--insecure", is_flag=True, help="oci:// only: plain HTTP to a host other than loopback.")
@click.option("--replace", is_flag=True, help="Replace an existing remote of this name (and drop its stored credentials).")
@click.option("--no-check", is_flag=True, help="Store the credentials without trying them on the remote (offline setup).")
@json_option
def remote_add(name, url, username, password_stdin, token_stdin, endpoint, insecure, replace, no_check, json_):
    """Add a remote NAME for URL (oci://HOST[:PORT]/NAMESPACE or hf://ORG).

    Loopback hosts (localhost, 127.0.0.1) are spoken to over plain HTTP,
    others over HTTPS unless --insecure. Credentials given here are tried on
    the remote first (GET /v2/, or the Hub's whoami): refused ones are not
    stored (exit 9); a remote that cannot be reached is added with a warning.

    \b
    Examples:
      adapterhub remote add team oci://registry.example.com/ml
      echo "$PASSWORD" | adapterhub remote add local oci://127.0.0.1:5000/team -u alice --password-stdin
      adapterhub remote add hub hf://my-org --endpoint https://hub.example.com --token-stdin < token.txt
    """
    from adapterhub.registry import remotes

    out = Output(json_)
    password, token = _read_secret(username, password_stdin, token_stdin)
    check = None  # no credentials given
    if username or token:
        remotes.check_remote_name(name)
        check = _check(out, name, url, endpoint, insecure, username, password, token, no_check)
    with _registry() as reg:
        r = remotes.add(reg, name, url, endpoint=endpoint, insecure=insecure, username=username, password=password,
                        token=token, replace=replace)
        d = r.to_dict(with_credentials=True)
    d["credentials_check"] = check
    out.result(d, lambda: echo(f"added remote {r.name} -> {r.url}" + (f" (credentials: {d['credentials']})" if d["credentials"] != "none" else "")))


def _read_secret(username: str | None, password_stdin: bool, token_stdin: bool) -> tuple[str | None, str | None]:
    """(password, token) from stdin, as the options ask; passwords are never arguments."""
    password = token = None
    if password_stdin and token_stdin:
        raise click.UsageError("--password-stdin and --token-stdin do not go together")
    if password_stdin:
        if not username:
            raise click.UsageError("--password-stdin needs --username")
        password = sys.stdin.readline().rstrip("\r\n")
    elif username:
        raise click.UsageError("--username needs --password-stdin (passwords are never taken as arguments)")
    if token_stdin:
        token = sys.stdin.readline().strip()
        if not token:
            raise click.UsageError("--token-stdin read an empty token")
    return password, token


def _check(out: Output, name: str, url: str, endpoint: str | None, insecure: bool, username: str | None,
           password: str | None, token: str | None, no_check: bool) -> str:
    """Try the credentials on the remote (a refusal raises); "ok", "unchecked" or "skipped"."""
    from adapterhub.registry import remotes

    if no_check:
        return "skipped"
    note = remotes.check_credentials(url, endpoint=endpoint, insecure=insecure, username=username, password=password,
                                     token=token)
    if note is not None:
        out.warn(f"the credentials were not checked: {note}; they are stored anyway "
                 f"(`adapterhub search --remote {name}` tries them)")
    return "ok" if note is None else "unchecked"


@remote_group.command(name="login")
@click.argument("name")
@click.option("--username", "-u", help="User name for the registry (with --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--token-stdin", is_flag=True, help="Read a token from stdin (Hub token, or a registry bearer token).")
@click.option("--no-check", is_flag=True, help="Store the credentials without trying them on the remote (offline setup).")
@json_option
def remote_login(name, username, password_stdin, token_stdin, no_check, json_):
    """Store credentials for the remote NAME, as `docker login` does.

    They are tried on the remote first (GET /v2/ with its auth challenge, or
    the Hub's whoami): refused ones are not stored (exit 9). They go to
    $ADAPTERHUB_HOME/credentials.json (mode 0600), never into the index.
    Without stored ones, the environment and Docker's credential helpers
    (credsStore, credHelpers) and auths are used.

    \b
    Examples:
      echo "$PASSWORD" | adapterhub remote login team -u alice --password-stdin
      adapterhub remote login hub --token-stdin < token.txt
    """
    from adapterhub.registry import remotes

    out = Output(json_)
    password, token = _read_secret(username, password_stdin, token_stdin)
    if not username and not token:
        raise click.UsageError("give --username with --password-stdin, or --token-stdin")
    with _registry() as reg:
        r = remotes.get(reg, name)
    check = _check(out, name, str(r.url), r.endpoint, r.insecure, username, password, token, no_check)
    with _registry() as reg:
        remotes.login(reg, name, username=username, password=password, token=token)
        d = remotes.get(reg, name).to_dict(with_credentials=True)
    d["credentials_check"] = check
    out.result(d, lambda: echo(f"logged in to {r.name} ({r.url})"))


@remote_group.command(name="logout")
@click.argument("name")
@json_option
def remote_logout(name, json_):
    """Forget the credentials stored for the remote NAME.

    \b
    Example:
      adapterhub remote logout team
    """
    from adapterhub.registry import remotes

    out = Output(json_)
    with _registry() as reg:
        r = remotes.logout(reg, name)
        d = r.to_dict(with_credentials=True)
    out.result(d, lambda: echo(f"logged out of {r.name}" + (f" (credentials still come from {d['credentials']})"
                                                                   if d["credentials"] != "none" else "")))


@remote_group.command(name="ls")
@json_option
def remote_ls(json_):
    """List remotes, with where their credentials come from (`remote list` works too).

    \b
    Example:
      adapterhub remote ls
    """
    from adapterhub.registry import remotes

    out = Output(json_)
    with _registry() as reg:
        rows = [r.to_dict(with_credentials=True) for r in remotes.ls(reg)]

    def human():
        if not rows:
            echo("no remotes: `adapterhub remote add NAME URL` adds one", err=True)
        else:
            table(("name", "url", "endpoint", "credentials"), [(r["name"], r["url"], r["endpoint"], r["credentials"]) for r in rows])

    out.result(rows, human)


@remote_group.command(name="rm")
@click.argument("name")
@json_option
def remote_rm(name, json_):
    """Remove a remote, its stored credentials and its cached search results.

    \b
    Example:
      adapterhub remote rm team
    """
    from adapterhub.registry import remotes

    out = Output(json_)
    with _registry() as reg:
        r = remotes.rm(reg, name)
    out.result({"removed": r.name, "url": str(r.url)}, lambda: echo(f"removed remote {r.name}"))


# -- push / pull / search against remotes (called by registry_cmds) ----------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def push_to_remote(ref: str, target: str | None, remote: str | None, tags: tuple[str, ...], json_: bool, quiet: bool) -> None:
    from adapterhub.registry import remotes

    from adapterhub.cli._output import human_size

    out = Output(json_, quiet)
    with _registry() as reg:
        from adapterhub.trust.remote_gate import remote_gate

        ep = remotes.resolve(reg, url=target, remote=remote)
        res = remotes.push_remote(reg, ref, ep, tags=tags, progress=out.progress, gate=remote_gate(reg))

    def human():
        where = res.get("target") or res.get("url") or str(ep.url)
        if quiet:
            echo(where)
            return
        if "files_uploaded" in res:
            # Files and metadata counted apart: a count of blobs mixes in the config and the signature bundles.
            parts = [(f"{_count(res['files_uploaded'], 'file')} uploaded ({human_size(res['file_bytes_uploaded'])}), "
                      f"{res['files_present']} already there"),
                     "config uploaded" if res["config_uploaded"] else "config already there"]
            if res.get("signatures_pushed") or res.get("signatures_present"):
                parts.append(f"{_count(res.get('signatures_pushed', 0), 'signature')} pushed, "
                             f"{res.get('signatures_present', 0)} already there")
            echo(f"pushed {res['ref']} to {where}: {'; '.join(parts)}")
            echo(f"manifest {res['manifest_digest'][:19]}…  artifact {res['artifact_digest'][:19]}…")
        else:
            echo(f"pushed {res.get('ref', ref)} to {where}")

    out.result(res, human)


def pull_from_remote(ref: str, remote: str | None, name: str | None, require_signature: bool, json_: bool, quiet: bool,
                     *, final: bool, require_provenance: bool = False) -> dict:
    """Import REF into the local registry; print the result when nothing follows (no DEST)."""
    from adapterhub.registry import remotes

    from adapterhub.cli._output import human_size

    out = Output(json_, quiet)
    with _registry() as reg:
        if remote:
            ep = remotes.resolve(reg, remote=remote, ref=ref)
        else:
            ep = remotes.resolve(reg, url=ref)
        from adapterhub.trust.remote_gate import remote_gate

        gate = remote_gate(reg, require_signature=require_signature, require_provenance=require_provenance)
        res = remotes.pull_remote(reg, ep, gate=gate, name=name, progress=out.progress)
    for w in res.get("warnings") or []:
        if not json_:
            say("warning", w)
    if final:
        def human():
            if quiet:
                echo(res["ref"])
                return
            extra = ""
            if "blobs_downloaded" in res:
                extra = f"  {res['blobs_downloaded']} blobs downloaded, {res.get('blobs_local', 0)} already here"
                if res.get("resumed_bytes"):
                    extra += f", resumed {human_size(res['resumed_bytes'])}"
            echo(f"imported {res['ref']} from {res.get('source', ep.url)}  {res['digest'][:19]}{extra}")
            if res.get("signatures"):
                echo(f"signatures: {res['signatures']}")

        out.result(res, human)
    else:
        out.message(f"imported {res['ref']} from {res.get('source', ep.url)}")
    return res


def search_remote_cmd(remote: str, cached: bool, text: str | None, json_: bool, quiet: bool, names: tuple[str, ...] = (),
                      **filters) -> None:
    from adapterhub.registry import remotes

    from adapterhub.cli._output import human_size

    out = Output(json_, quiet)
    warnings: list[str] = []
    with _registry() as reg:
        found = remotes.search_remote(reg, remote, cached=cached, names=names, warnings=warnings)
    for w in warnings:
        out.warn(w)
    rows = remotes.filter_rows(found, text, **filters)
    if cached and not found:
        echo(f"no cached results for {remote}: run `adapterhub search --remote {remote}` (without --cached) to fetch",
                   err=True)

    def human():
        if quiet:
            for r in rows:
                echo(r["url"])  # what `pull` takes (with or without --remote)
        elif not rows:
            if found or not cached:  # (an empty cache was reported above)
                echo("no matches", err=True)
        else:
            table(
                ("repository", "tags", "kind", "method", "rank", "quant", "base model", "size"),
                [(r["repository"], ",".join(r["tags"]) or None, r["kind"], r["method"], r["rank"], r["quant"],
                  r["base_model"], human_size(r["size"])) for r in rows],
            )

    out.result(rows, human)
