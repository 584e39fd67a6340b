"""Schema of the registry index, as append-only sqlite-utils migrations.

Never edit a migration that has shipped: add a new function at the end, and add
its name to ``registry.index.SCHEMA`` (a test checks that the two agree). The
read path compares ``SCHEMA`` against ``_sqlite_migrations`` with plain sqlite3,
so commands like ``ls`` never pay for importing sqlite-utils.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("adapterhub")


@migrations()
def m001_initial(db: Database) -> None:
    # One row per distinct content; the digest is the model-signing root digest.
    db["artifacts"].create(
        {
            "digest": str,
            "kind": str,
            "format": str,
            "method": str,
            "base_model": str,
            "base_revision": str,
            "rank": int,
            "alpha": float,
            "quant": str,
            "task_type": str,
            "size": int,
            "file_count": int,
            "params": int,
            "dtypes": str,  # JSON list
            "fingerprint": str,  # sha256:... of the base fingerprint, when there is one
            "inspection": str,  # JSON of adapterhub.artifact.Inspection
            "created_at": str,
        },
        pk="digest",
        not_null={"kind", "size", "file_count", "inspection", "created_at"},
    )
    for cols in (["kind"], ["method"], ["base_model"], ["rank"], ["quant"]):
        db["artifacts"].create_index(cols)

    db["files"].create(
        {"digest": str, "path": str, "size": int, "sha256": str},
        pk=("digest", "path"),
        not_null={"size", "sha256"},
    )
    db["files"].create_index(["sha256"])

    db["names"].create(
        {"name": str, "description": str, "created_at": str, "updated_at": str},
        pk="name",
        not_null={"created_at", "updated_at"},
    )

    db["versions"].create(
        {
            "id": int,
            "name": str,
            "version": str,
            "seq": int,  # numeric versions sort by this; others by creation order
            "digest": str,
            "description": str,
            "search_text": str,  # denormalised metadata for full-text search
            "created_at": str,
        },
        pk="id",
        not_null={"name", "version", "digest", "created_at"},
    )
    db["versions"].create_index(["name", "version"], unique=True)
    db["versions"].create_index(["digest"])
    db["versions"].enable_fts(["name", "description", "search_text"], create_triggers=True)

    db["tags"].create(
        {"name": str, "tag": str, "version": str, "updated_at": str},
        pk=("name", "tag"),
        not_null={"version", "updated_at"},
    )

    # Flattened metadata (key/value) for generic filters and `show`.
    db["metadata"].create(
        {"digest": str, "key": str, "value": str},
        pk=("digest", "key"),
    )
    db["metadata"].create_index(["key", "value"])

    # Filled by conversions (derived_from) and signing; created now so the
    # schema is complete from the first release.
    db["lineage"].create(
        {
            "digest": str,
            "parent": str,
            "relation": str,  # adapter | base | source
            "recipe": str,  # JSON: tool version, operation, options
            "created_at": str,
        },
        pk=("digest", "parent", "relation"),
    )
    db["lineage"].create_index(["parent"])
    db["signatures"].create(
        {
            "digest": str,  # artifact digest (the signature's subject)
            "blob": str,  # sha256 hex of the bundle in the blob store
            "key_id": str,
            "created_at": str,
        },
        pk=("digest", "blob"),
    )


@migrations()
def m002_trust(db: Database) -> None:
    # `signatures` holds every signed statement about a digest:
    # kind `model` (an OpenSSF model-signing bundle) or `provenance` (an
    # adapterhub provenance attestation, same bundle shape).
    db["signatures"].add_column("kind", str, not_null_default="model")
    db["signatures"].create_index(["digest"])
    db["trusted_keys"].create(
        {
            "key_id": str,  # sha256 hex of the public key PEM: model-signing's key hint
            "name": str,
            "public_key": str,  # PEM (SubjectPublicKeyInfo)
            "scopes": str,  # JSON list of namespaces; empty: every namespace
            "not_after": str,  # ISO 8601 UTC; signatures fail from then on
            "added_at": str,
            "revoked_at": str,
            "revoked_reason": str,
        },
        pk="key_id",
        not_null={"public_key", "scopes", "added_at"},
    )
    db["policy"].create(
        {"namespace": str, "rule": str, "created_at": str},  # namespace "*": everywhere
        pk=("namespace", "rule"),
        not_null={"created_at"},
    )


@migrations()
def m003_files_size_index(db: Database) -> None:
    # push asks "does any stored file have this size?" to decide whether a
    # file can be copied and hashed in one pass.
    db["files"].create_index(["size"])


@migrations()
def m004_verifications(db: Database) -> None:
    # Numerical verification reports (adapterhub verify), several per
    # digest over time; `show` prints the newest and `search --verified` keeps
    # digests whose newest verdict is PASS.
    db["verifications"].create(
        {
            "id": int,
            "digest": str,
            "verdict": str,  # PASS | FAIL
            "format": str,  # fp32, bf16, fp16, nf4, fp4, int8
            "device": str,
            "report": str,  # JSON of adapterhub.verify.VerifyReport
            "created_at": str,
        },
        pk="id",
        not_null={"digest", "verdict", "report", "created_at"},
    )
    db["verifications"].create_index(["digest"])


@migrations()
def m005_remotes(db: Database) -> None:
    # Remotes (OCI registries, Hugging Face Hub orgs) by name. Credentials are
    # never stored here: they live in $ADAPTERHUB_HOME/credentials.json (0600).
    db["remotes"].create(
        {"name": str, "url": str, "kind": str, "endpoint": str, "insecure": int, "created_at": str},
        pk="name",
        not_null={"url", "kind", "created_at"},
    )
    # What `search --remote` last saw on a remote, one row per remote artifact
    # (an OCI manifest or a Hub repo revision), for offline `--cached` search.
    db["remote_artifacts"].create(
        {
            "remote": str,
            "repository": str,
            "manifest_digest": str,  # OCI manifest digest, or the Hub commit
            "tags": str,  # JSON list
            "artifact_type": str,
            "name": str,
            "version": str,
            "digest": str,  # adapterhub artifact digest, when the remote says
            "kind": str,
            "method": str,
            "base_model": str,
            "rank": int,
            "quant": str,
            "size": int,
            "description": str,
            "metadata": str,  # JSON: annotations and what else the remote told
            "fetched_at": str,
        },
        pk=("remote", "repository", "manifest_digest"),
        not_null={"fetched_at"},
    )


@migrations()
def m006_version_seq(db: Database) -> None:
    # The highest integer version a name has ever had. Versions are immutable
    # and may already be on a remote, so `rm` must never free a number for
    # the next push to reuse; the `names` row now outlives its versions.
    db["names"].add_column("last_seq", int, not_null_default=0)
    db.execute(
        "update names set last_seq = coalesce((select max(seq) from versions v where v.name = names.name), 0)"
    )


@migrations()
def m007_records(db: Database) -> None:
    # Every change to the index is also written to the blob store as a small
    # JSON record blob (registry/records.py), so that a lost or damaged
    # index.db can be rebuilt from the store (`fsck --rebuild-index`). This
    # table names the record blob that holds the current state of each
    # (kind, key): it keeps them from gc, and superseded ones become garbage.
    db["records"].create(
        {"kind": str, "key": str, "blob": str, "digest": str},  # digest: the artifact, when the record is about one
        pk=("kind", "key"),
        not_null={"blob"},
    )
    db["records"].create_index(["digest"])
    # One row per flag (rows, not columns, so later flags need no migration).
    db["meta"].create({"key": str, "value": str}, pk="key")


@migrations()
def m008_read_indexes(db: Database) -> None:
    # Every read query has an index to use (tests/test_query_plans.py runs
    # EXPLAIN QUERY PLAN on each): the tags of a version, and the versions of
    # a name in push order (ls NAME, latest fallback, the next version number).
    db["tags"].create_index(["name", "version"])
    db["versions"].create_index(["name", "id"])
    # search --method/--quant/--kind compare without case; --verified starts from the PASS rows.
    for col in ("method", "quant", "kind"):
        db.execute(f"create index idx_artifacts_{col}_nocase on artifacts ({col} collate nocase)")
    db["verifications"].create_index(["verdict", "digest"])


@migrations()
def m009_listing_indexes(db: Database) -> None:
    # `ls --all` of 100,000 versions (issue 14) reads every listed column from
    # two covering indexes instead of the wide rows (versions carry their
    # search text, artifacts their inspection JSON): the versions of each name
    # in push order (it replaces m008's (name, id), its prefix), and an
    # artifact's listed columns by digest (unique, as the digest is).
    db.execute("drop index if exists idx_versions_name_id")
    db.execute(
        "create index idx_versions_listing on versions (name, id, version, digest, created_at, description)"
    )
    db.execute(
        "create unique index idx_artifacts_listing on artifacts"
        " (digest, kind, method, base_model, rank, quant, size, file_count)"
    )
