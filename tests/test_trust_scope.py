"""Every trust decision is made for the name being acted on, exactly as listed.

Scopes are namespaces matched whole (never by prefix); a name outside any
namespace is outside every scope; policy rules apply exactly as listed or are
refused when set; provenance is judged in the scope of the ref being pulled or
verified, not in that of whichever name first held the digest.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("model_signing")

from adapterhub.registry import Registry
from adapterhub.trust import keys, policy, provenance, signing

from .conftest import fake_lora


def _scoped_key(cli, tmp_path, scope: str) -> None:
    cli("keys", "generate", "alice", "--no-trust")
    pub = tmp_path / "alice.pub"
    pub.write_text(cli("keys", "export", "alice").stdout)
    assert cli("trust", "add", pub, "--name", "alice", "--scope", scope).exit_code == 0


def test_scope_is_a_whole_namespace_not_a_prefix(cli, tmp_path):
    _scoped_key(cli, tmp_path, "team")
    cli("push", fake_lora(tmp_path / "a"), "teamx/qa", "--sign", "--key", "alice")
    r = cli("verify-signature", "teamx/qa")
    assert r.exit_code == 8 and "trusted only for team" in r.output
    cli("push", fake_lora(tmp_path / "b", seed=2), "team/qa", "--sign", "--key", "alice")
    assert cli("verify-signature", "team/qa").exit_code == 0


def test_scoped_key_does_not_vouch_outside_any_namespace(cli, tmp_path):
    _scoped_key(cli, tmp_path, "team")
    cli("push", fake_lora(tmp_path / "a"), "qa", "--sign", "--key", "alice")
    r = cli("verify-signature", "qa")
    assert r.exit_code == 8 and "outside a namespace" in r.output


def test_policy_for_a_full_name_is_refused_not_ignored(cli, tmp_path):
    r = cli("policy", "set", "require-signature", "--namespace", "team/qa")
    assert r.exit_code == 2 and "namespace" in r.output and "team" in r.output
    assert json.loads(cli("policy", "show", "--json").stdout) == []
    for bad in ("team\n", "Team", "../x", ""):
        assert cli("policy", "set", "require-signature", "--namespace", bad).exit_code == 2, repr(bad)
    assert json.loads(cli("policy", "show", "--json").stdout) == []


def test_every_listed_rule_is_enforced(cli, tmp_path):
    """Whatever `policy show` lists, a pull of an unsigned artifact in its scope is refused."""
    cli("push", fake_lora(tmp_path / "a"), "team/qa")
    cli("push", fake_lora(tmp_path / "b", seed=2), "solo")
    cli("policy", "set", "require-signature", "--namespace", "team")
    rules = json.loads(cli("policy", "show", "--json").stdout)
    assert [(x["namespace"], x["rule"]) for x in rules] == [("team", "require-signature")]
    assert cli("pull", "team/qa", tmp_path / "d").exit_code == 8
    assert cli("pull", "solo", tmp_path / "s").exit_code == 0
    cli("policy", "set", "require-signature")
    assert cli("pull", "solo", tmp_path / "s2").exit_code == 8


def test_signature_judged_for_the_name_pulled_not_the_first_name(cli, tmp_path):
    """The same content under acme/x (first) and prod/x: a key for acme does not vouch for prod/x."""
    _scoped_key(cli, tmp_path, "acme")
    a = fake_lora(tmp_path / "a")
    cli("push", a, "acme/x")
    cli("push", a, "prod/x")
    assert cli("sign", "acme/x", "--key", "alice").exit_code == 0
    assert cli("verify-signature", "acme/x").exit_code == 0
    r = cli("verify-signature", "prod/x")
    assert r.exit_code == 8 and "trusted only for acme" in r.output
    cli("policy", "set", "require-signature", "--namespace", "prod")
    r = cli("pull", "prod/x", tmp_path / "d")
    assert r.exit_code == 8 and not (tmp_path / "d").exists()
    reg = Registry()
    digest = reg.resolve("prod/x").digest
    assert provenance.signature_check(reg, digest, name="prod/x")[0] == "failed"
    assert provenance.signature_check(reg, digest, name="acme/x")[0] == "verified"


def test_provenance_judged_for_the_name_pulled(cli, tmp_path):
    """A derived artifact attested by a key for acme only: pulling it as prod/merged under
    require-provenance for prod is refused, as acme/merged it passes."""
    pytest.importorskip("torch")
    from adapterhub.convert import merge

    from .factories import lora_adapter, tiny_llama_base

    reg = Registry()
    keys.generate()
    policy.add(reg, keys.get("default").public_pem, name="default", scopes=("acme",))
    base = tiny_llama_base(tmp_path / "base")
    reg.push(lora_adapter(tmp_path / "lora", base_dir=base), "acme/lora")
    reg.push(base, "acme/base")
    for ref in ("acme/lora", "acme/base"):
        signing.sign_ref(reg, ref, keys.get("default"))
    merge("acme/lora", base="acme/base", push="acme/merged", registry=reg, device="cpu")
    merged = reg.resolve("acme/merged")
    out = tmp_path / "m"
    assert cli("pull", "acme/merged", out).exit_code == 0
    reg.push(out, "prod/merged")  # the same content (model.sig is not part of it) under a second name
    assert reg.resolve("prod/merged").digest == merged.digest
    assert provenance.verify_chain(reg, "acme/merged").ok
    assert not provenance.verify_chain(reg, "prod/merged").ok
    cli("policy", "set", "require-provenance", "--namespace", "prod")
    r = cli("pull", "prod/merged", tmp_path / "p")
    assert r.exit_code == 8 and not (tmp_path / "p").exists()


# -- mutation testing (docs/reliability.md): refusals say why, exactly ---------------------------


def test_a_policy_scope_refusal_says_what_to_use_instead():
    from adapterhub.errors import UsageError

    with pytest.raises(UsageError) as e:
        policy.check_namespace("team/qa")
    assert str(e.value) == "'team/qa' is a full name: a policy rule applies to a namespace (the part before '/')"
    assert e.value.hint == "--namespace team"
    for no_namespace in ("/qa", "/"):  # nothing before the '/': no namespace to suggest
        with pytest.raises(UsageError) as e:
            policy.check_namespace(no_namespace)
        assert e.value.hint is None, no_namespace
    with pytest.raises(UsageError) as e:
        policy.check_namespace("team/")
    assert e.value.hint == "--namespace team"
    with pytest.raises(UsageError, match=r"^'Team' is not a namespace: "):
        policy.check_namespace("Team")


def test_a_provenance_key_refusal_names_the_key_and_the_reason():
    from adapterhub.errors import TrustError

    reg = Registry()
    keys.generate()
    tk = policy.add(reg, keys.get("default").public_pem, name="default", scopes=("acme",))
    unknown = "0123456789abcdef" + "f" * 48
    with pytest.raises(TrustError) as e:
        provenance._trusted_pem(reg, unknown, ["acme/x"])
    assert str(e.value) == "signed by key 0123456789abcdef…, which is not trusted"
    with pytest.raises(TrustError) as e:
        provenance._trusted_pem(reg, tk.key_id, ["prod/x"])
    assert str(e.value) == f"key default ({tk.key_id[:16]}…) is trusted only for acme, not for namespace 'prod'"
    # an input held under several names: a key trusted for one of them vouches for it
    assert provenance._trusted_pem(reg, tk.key_id, ["prod/x", "acme/x"]) == (tk.public_key.encode(), "default")


def test_namespace_is_the_first_part_of_a_name():
    assert policy.namespace_of("team/qa") == "team"
    assert policy.namespace_of("qa") == ""
    assert policy.namespace_of("a/b/c") == "a"  # never a longer prefix


def test_why_a_key_may_not_vouch_in_exact_words():
    kid = "0123456789abcdef" * 4
    key = policy.TrustedKey(kid, None, "", ("acme", "team"), None, "2026-01-01T00:00:00Z", None, None)
    label = "key 0123456789abcdef (0123456789abcdef…)"
    assert key.problem("prod") == f"{label} is trusted only for acme, team, not for namespace 'prod'"
    assert key.problem("") == f"{label} is trusted only for acme, team, not for artifacts outside a namespace"
    assert key.problem(None) == key.problem("")
    assert key.problem("acme") is None and key.problem("team") is None
    anywhere = policy.TrustedKey(kid, "alice", "", (), None, "", None, None)
    assert anywhere.problem("prod") is None and anywhere.problem("") is None
    expiring = policy.TrustedKey(kid, "alice", "", ("acme",), "2026-06-01T00:00:00Z", "", None, None)
    assert expiring.problem("acme", at="2026-05-31T23:59:59Z") is None
    assert expiring.problem("acme", at="2026-06-01T00:00:00Z") == "key alice (0123456789abcdef…) expired on 2026-06-01T00:00:00Z"
    assert expiring.problem("prod", at="2026-07-01T00:00:00Z").endswith("expired on 2026-06-01T00:00:00Z")  # before scope
    revoked = policy.TrustedKey(kid, "alice", "", ("acme",), "2026-06-01T00:00:00Z", "", "2026-02-01T00:00:00Z", "lost laptop")
    assert revoked.problem("acme", at="2026-03-01T00:00:00Z") == "key alice (0123456789abcdef…) was revoked on 2026-02-01T00:00:00Z: lost laptop"
    silent = policy.TrustedKey(kid, "alice", "", (), None, "", "2026-02-01T00:00:00Z", None)
    assert silent.problem("acme") == "key alice (0123456789abcdef…) was revoked on 2026-02-01T00:00:00Z"
