"""Trust: signing keys, signatures (DSSE, model-signing bundles), the trust
policy, signed provenance, and the gate that enforces policy on pulls,
conversions and remote imports.

- ``trust.keys``: the local key store (EC keys, passphrase-protected).
- ``trust.signing``: sign and verify an artifact (model-signing's format).
- ``trust.policy``: trusted public keys with scopes, and policy rules.
- ``trust.provenance``: signed lineage statements and chain verification.
- ``trust.gate``: what pull, conversions and imports call to enforce policy.
"""
