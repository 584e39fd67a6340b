"""trust (add, ls, rm) and policy (set, unset, show)."""

from __future__ import annotations

from pathlib import Path

import click

from adapterhub.cli._common import Group, known_as, namespace_option, registry, short_id
from adapterhub.cli._output import Output, echo, json_option, table


@click.group(name="trust", cls=Group)
def trust_group():
    """Manage the public keys whose signatures count.

    \b
    Examples:
      adapterhub trust add alice.pub --name alice --namespace team
      adapterhub trust ls
      adapterhub trust rm alice
    """


@trust_group.command(name="add")
@click.argument("pub", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="A name to show for the key.")
@namespace_option("Trust it only for names in this namespace (repeatable; --scope is the old spelling).", multiple=True, dest="scopes", hidden_aliases=("--scope",))
@click.option("--expires", help="Signatures by this key fail from this date (YYYY-MM-DD, in the future).")
@click.option("--replace", is_flag=True, help="The key is already listed: set its name, namespaces and expiry anew (and clear a revocation).")
@json_option
def trust_add(pub: Path, name: str | None, scopes: tuple[str, ...], expires: str | None, replace: bool, json_: bool):
    """Trust the EC public key in PUB (PEM).

    Adding a key that is already listed (trusted or revoked) with another
    name, namespace or expiry exits 5 and says what would change; --replace
    changes it. An --expires date in the past exits 2.

    \b
    Examples:
      adapterhub trust add alice.pub --name alice --namespace team --expires 2027-01-01
      adapterhub trust add alice.pub --name alice --namespace team --namespace ml --replace
    """
    from adapterhub.trust import policy

    not_after = policy.parse_expiry(expires) if expires else None
    with registry() as reg:
        tk = policy.add(reg, pub.read_bytes(), name=name, scopes=scopes, not_after=not_after, replace=replace)
    Output(json_).result(tk.to_dict(), lambda: echo(f"trusted key {tk.name or short_id(tk.key_id)} {tk.key_id}"))


@trust_group.command(name="ls")
@json_option
def trust_ls(json_: bool):
    """List trusted (and revoked) keys (`trust list` works too).

    \b
    Example:
      adapterhub trust ls --json
    """
    from adapterhub.trust import policy

    with registry() as reg:
        ks = policy.ls(reg)
    rows = [
        (k.name, k.key_id[:16], ",".join(k.scopes) or "all", k.not_after, f"revoked {k.revoked_at}" if k.revoked_at else "trusted")
        for k in ks
    ]
    Output(json_).result(
        [k.to_dict() for k in ks],
        lambda: table(("name", "key id", "namespaces", "expires", "status"), rows) if ks else echo("no trusted keys", err=True),
    )


@trust_group.command(name="rm")
@click.argument("key")
@json_option
def trust_rm(key: str, json_: bool):
    """Stop trusting KEY (name or key id): its signatures fail from now on.

    \b
    Example:
      adapterhub trust rm alice
    """
    from adapterhub.trust import policy

    with registry() as reg:
        tk = policy.remove(reg, key)
    Output(json_).result(tk.to_dict(), lambda: echo(f"no longer trusted: {known_as(key, tk)}"))


# -- policy ------------------------------------------------------------------------------

_RULE = click.Choice(["require-signature", "require-provenance"])


@click.group(name="policy")
def policy_group():
    """Trust policy: what pull and conversions refuse (fail closed, exit 8).

    require-signature: an artifact needs a valid signature by a trusted key.
    require-provenance: a merged or quantized artifact (pulled, or taken
    from the registry by a conversion) needs a signed provenance chain in
    which no link fails (`adapterhub provenance REF` shows it).

    \b
    Examples:
      adapterhub policy set require-signature
      adapterhub policy set require-provenance --namespace team
      adapterhub policy show
      adapterhub policy unset require-signature
    """


@policy_group.command(name="set")
@click.argument("rule", type=_RULE)
@namespace_option("Only for names in this namespace (default: everywhere).")
@json_option
def policy_set(rule: str, namespace: str | None, json_: bool):
    """Add a rule.

    \b
    Example:
      adapterhub policy set require-signature --namespace team
    """
    from adapterhub.trust import policy

    with registry() as reg:
        r = policy.set_rule(reg, rule, namespace)
    Output(json_).result(r, lambda: echo(f"policy: {rule} for {r['namespace']}"))


@policy_group.command(name="unset")
@click.argument("rule", type=_RULE)
@namespace_option("The namespace the rule was set for (default: everywhere).")
@json_option
def policy_unset(rule: str, namespace: str | None, json_: bool):
    """Remove a rule.

    \b
    Example:
      adapterhub policy unset require-signature
    """
    from adapterhub.trust import policy

    with registry() as reg:
        r = policy.unset_rule(reg, rule, namespace)
    Output(json_).result(r, lambda: echo(f"removed policy: {rule} for {r['namespace']}"))


@policy_group.command(name="show")
@json_option
def policy_show(json_: bool):
    """Show the rules.

    \b
    Example:
      adapterhub policy show --json
    """
    from adapterhub.trust import policy

    with registry() as reg:
        rs = policy.rules(reg)
    Output(json_).result(
        rs,
        lambda: table(("namespace", "rule", "since"), [(r["namespace"], r["rule"], r["created_at"]) for r in rs]) if rs else echo("no policy: nothing is required", err=True),
    )


