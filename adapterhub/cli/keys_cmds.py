"""keys: generate, ls, export, import, rm, revoke."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from adapterhub.cli._common import Group, known_as, prompt_passphrase, registry
from adapterhub.cli._output import Output, echo, json_option, table



@click.group(name="keys", cls=Group)
def keys_group():
    """Manage signing keys (EC P-256) under $ADAPTERHUB_HOME/keys.

    Private keys are stored with mode 0600, optionally encrypted with a
    passphrase (asked on a terminal, or read from ADAPTERHUB_KEY_PASSPHRASE).
    A key id is the sha256 of the public key PEM, the key hint model-signing
    writes into a bundle. The default signing key is $ADAPTERHUB_KEY, else the
    key named `default`, else the only key.

    \b
    Examples:
      adapterhub keys generate
      adapterhub keys generate release --passphrase
      adapterhub keys ls
      adapterhub keys export release > release.pub
    """


@keys_group.command(name="generate")
@click.argument("name", default="default")
@click.option("--passphrase", "encrypt", is_flag=True, help="Encrypt the private key (passphrase from a prompt or ADAPTERHUB_KEY_PASSPHRASE).")
@click.option("--no-trust", is_flag=True, help="Do not add the new public key to the trusted keys.")
@json_option
def keys_generate(name: str, encrypt: bool, no_trust: bool, json_: bool):
    """Create an EC P-256 key pair and trust its public key.

    \b
    Examples:
      adapterhub keys generate
      ADAPTERHUB_KEY_PASSPHRASE=... adapterhub keys generate ci --passphrase
    """
    from adapterhub.trust import keys
    from adapterhub.trust import policy
    from adapterhub.errors import UsageError

    out = Output(json_)
    passphrase = None
    if encrypt:
        passphrase = os.environ.get(keys.PASSPHRASE_ENV)
        if not passphrase:
            if not sys.stdin.isatty():
                raise UsageError(f"--passphrase needs a terminal or {keys.PASSPHRASE_ENV}")
            passphrase = click.prompt("new passphrase", hide_input=True, confirmation_prompt=True, err=True)
    k = keys.generate(name, passphrase=passphrase)
    if not no_trust:
        with registry() as reg:
            policy.add(reg, k.public_pem, name=k.name)
    out.result(
        {**k.to_dict(), "trusted": not no_trust},
        lambda: echo(f"generated key {k.name}  {k.key_id}" + ("  (encrypted)" if k.encrypted else "") + ("" if no_trust else "  trusted")),
    )


@keys_group.command(name="ls")
@json_option
def keys_ls(json_: bool):
    """List your keys (`keys list` works too).

    \b
    Example:
      adapterhub keys ls --json
    """
    from adapterhub.trust import keys

    out = Output(json_)
    ks = keys.list_keys()
    default = keys.default_key() if ks else None
    rows = [(k.name, k.key_id[:16], "yes" if k.private_path else "public only", "yes" if k.encrypted else "no",
             "*" if default and default.name == k.name else "") for k in ks]
    out.result(
        [{**k.to_dict(), "default": bool(default and default.name == k.name)} for k in ks],
        lambda: table(("name", "key id", "private", "encrypted", "default"), rows) if ks else echo("no keys: `adapterhub keys generate` makes one", err=True),
    )


@keys_group.command(name="export")
@click.argument("name")
@click.option("--private", is_flag=True, help="Print the private key PEM (as stored: encrypted if it is).")
@json_option
def keys_export(name: str, private: bool, json_: bool):
    """Print a key's public key PEM (what others pass to `trust add`).

    With --json: {"name", "key_id", "public_key_pem"} (and "private_key_pem"
    with --private).

    \b
    Examples:
      adapterhub keys export default > default.pub
      adapterhub keys export default --json
      model_signing verify key ./qa --signature ./qa/model.sig --public_key default.pub
    """
    from adapterhub.trust import keys
    from adapterhub.errors import NotFoundError

    k = keys.get(name)
    if private and k.private_path is None:
        raise NotFoundError(f"key {name!r} has no private key here")
    data = {"name": k.name, "key_id": k.key_id, "public_key_pem": k.public_path.read_text()}
    if private:
        assert k.private_path is not None
        data["private_key_pem"] = k.private_path.read_text()
    pem = data["private_key_pem"] if private else data["public_key_pem"]
    Output(json_).result(data, lambda: echo(pem, nl=False))


@keys_group.command(name="import")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def keys_import(name: str, path: Path, json_: bool):
    """Import a PEM EC private key (to sign with) or public key as NAME.

    An encrypted private key keeps its passphrase (ADAPTERHUB_KEY_PASSPHRASE
    or a prompt). Importing does not trust the key: use `trust add`.

    \b
    Example:
      adapterhub keys import release ./release.pem
    """
    from adapterhub.trust import keys

    pem = path.read_bytes()
    passphrase = None
    if b"ENCRYPTED" in pem.split(b"\n", 1)[0]:
        passphrase = os.environ.get(keys.PASSPHRASE_ENV) or prompt_passphrase(name)
    k = keys.import_key(name, pem, passphrase=passphrase, new_passphrase=passphrase)
    Output(json_).result(k.to_dict(), lambda: echo(f"imported key {k.name}  {k.key_id}"))


@keys_group.command(name="rm")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@json_option
def keys_rm(name: str, yes: bool, json_: bool):
    """Delete a key's files. Its signatures stay valid while its public key is trusted.

    \b
    Example:
      adapterhub keys rm old --yes
    """
    from adapterhub.trust import keys
    from adapterhub.errors import UsageError

    k = keys.get(name)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("pass --yes to delete a key without a terminal")
        click.confirm(f"delete key {k.name} ({k.key_id[:16]}…)?", abort=True, err=True)
    keys.remove(name)
    Output(json_).result(k.to_dict(), lambda: echo(f"deleted key {k.name}"))


@keys_group.command(name="revoke")
@click.argument("key")
@click.option("--reason", help="Recorded with the revocation.")
@json_option
def keys_revoke(key: str, reason: str | None, json_: bool):
    """Revoke KEY (a name or key id): its signatures fail from now on.

    \b
    Example:
      adapterhub keys revoke release --reason "laptop stolen"
    """
    from adapterhub.trust import keys
    from adapterhub.trust import policy

    pem = None
    try:
        pem = keys.get(key).public_pem
    except Exception:  # noqa: BLE001 - a trusted key that is not a local key
        pass
    with registry() as reg:
        tk = policy.revoke(reg, key, reason, public_pem=pem)
    Output(json_).result(tk.to_dict(), lambda: echo(f"revoked key {known_as(key, tk)}"))


