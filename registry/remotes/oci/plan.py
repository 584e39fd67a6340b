"""The plan of an OCI pull: the manifest and our config read and checked (a hostile
registry is assumed) before a single file byte is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapterhub.errors import IntegrityError, InvalidArtifactError, InvalidNameError
from adapterhub.registry.remotes.oci import media
from adapterhub.registry.remotes.oci.media import (
    CONFIG_TYPE,
    DOCKER_MANIFEST_TYPES,
    IMAGE_CONFIG_TYPES,
    INDEX_TYPE,
    SHA256_RE,
    TITLE,
)
from adapterhub.registry.remotes.validate import check_file_path, check_file_tree, check_lineage, check_text, parse_json

if TYPE_CHECKING:
    from adapterhub.registry.remotes.oci.client import Client


@dataclass
class Plan:
    repo: str
    reference: str
    manifest_digest: str
    ours: bool
    config: dict[str, Any]
    files: list[tuple[str, str, int]]  # (relpath, sha256 hex, size)
    name: str
    version: str | None
    annotations: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def read_config(client: Client, repo: str, desc: dict[str, Any], where: str) -> dict[str, Any]:
    """Our config blob: a valid digest first, at most :data:`CONFIG_LIMIT` bytes, a JSON object."""
    d = desc.get("digest")
    if not isinstance(d, str) or not SHA256_RE.fullmatch(d):
        raise InvalidArtifactError(f"{where}: the config has no valid sha256 digest")
    size = desc.get("size")
    if isinstance(size, int) and size > media.CONFIG_LIMIT:
        raise InvalidArtifactError(f"{where}: the config blob is {size} bytes; the limit is {media.CONFIG_LIMIT >> 20} MiB",
                                   hint="this is not an artifact adapterhub pushed")
    raw = client.get_small_blob(repo, d, limit=media.CONFIG_LIMIT, what="config blob")
    doc = parse_json(raw, f"{where}: the config blob", max_bytes=media.CONFIG_LIMIT)
    if not isinstance(doc, dict):
        raise InvalidArtifactError(f"{where}: the config blob is not a JSON object")
    return doc


def want_digest(plan: Plan, digest: str | None) -> str:
    from adapterhub.manifest import FileEntry, Manifest

    return digest or Manifest.from_entries(FileEntry(p, s, h) for p, h, s in plan.files).digest


def _manifest(client: Client, repo: str, reference: str, where: str) -> tuple[dict[str, Any], str]:
    """The manifest at ``reference`` as a JSON object, and its digest; an index or an image is refused."""
    got = client.get_manifest(repo, reference)
    assert got is not None
    data, media_type, mdigest = got
    if media_type in (INDEX_TYPE, DOCKER_MANIFEST_TYPES[1]):
        raise InvalidArtifactError(f"{where} is an image index, not one artifact",
                                   hint="pull one of its manifests by digest (oci://HOST/REPO@sha256:...)")
    m = parse_json(data, f"{where}: the manifest", max_bytes=media.MANIFEST_LIMIT)
    if not isinstance(m, dict):
        raise InvalidArtifactError(f"{where}: malformed manifest")
    return m, mdigest


def _layer_files(layers: list[Any], where: str) -> list[tuple[str, str, int]]:
    """(relpath, sha256 hex, size) of every layer, each a named file with a valid digest and size."""
    files = []
    for i, layer in enumerate(layers):
        layer_ann = layer.get("annotations") if isinstance(layer, dict) else None
        if not isinstance(layer, dict) or not isinstance(layer_ann or {}, dict):
            raise InvalidArtifactError(f"{where}: layer {i} is not a valid descriptor")
        title = (layer_ann or {}).get(TITLE)
        if title is None or title == "":
            raise InvalidArtifactError(f"{where}: layer {i} ({layer.get('mediaType')}) has no {TITLE} annotation, "
                                       "so it is not a file of an artifact",
                                       hint="only artifacts whose layers are named files can be pulled")
        title = check_file_path(title, f"{where}: layer {i}")
        d = layer.get("digest")
        size = layer.get("size")
        # The digest names the staged file: only sha256:<64 lowercase hex> gets that far.
        if not isinstance(d, str) or not SHA256_RE.fullmatch(d) or type(size) is not int or size < 0:
            raise InvalidArtifactError(f"{where}: layer {title!r} has no valid sha256 digest and size")
        files.append((title, d[7:], size))
    if not files:
        raise InvalidArtifactError(f"{where} has no files")
    return files


def _checked_config(client: Client, repo: str, desc: dict[str, Any], files: list[tuple[str, str, int]],
                    digest: str, where: str) -> dict[str, Any]:
    """Our config, agreeing with the layers, with what the import uses from it checked (before any download)."""
    from adapterhub.refs import check_tag

    config = read_config(client, repo, desc, where)
    listed = config.get("files")
    try:
        if not isinstance(listed, list):
            raise TypeError
        listed_set = {(f["path"], f["sha256"], f["size"]) for f in listed}
    except (KeyError, TypeError):
        raise InvalidArtifactError(f"{where}: the config's file list is malformed") from None
    if listed_set != set(files) or len(listed) != len(files):
        raise IntegrityError(f"{where}: the config's file list does not match the manifest's layers")
    if digest != config.get("digest"):
        raise IntegrityError(f"{where}: the files hash to {digest[:19]}…, not to the artifact digest "
                             f"{str(config.get('digest'))[:19]}… the config claims")
    config["lineage"] = check_lineage(config.get("lineage"), f"{where}: config")
    check_text(config.get("description"), "description", f"{where}: config")
    tags = config.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidArtifactError(f"{where}: the config's tags are not a list of names")
    config["tags"] = [check_tag(t) for t in tags]
    version = config.get("version")
    if version is not None and not isinstance(version, str):
        raise InvalidNameError(f"{where}: the config's version is not a string")
    return config


def default_name(repo: str, namespace: str | None) -> str:
    """The local name a pull gives ``repo`` without ``--name``: its path under the remote's namespace
    (``ns/team/qa-lora`` under ``oci://host/ns`` is ``team/qa-lora``), else its last component.

    Never what the artifact's own metadata says: a remote must not choose
    which local name it lands in (``team/prod``).
    """
    from adapterhub.refs import check_name

    if namespace is not None and repo.startswith(namespace + "/"):
        rel = repo[len(namespace) + 1:]
        try:
            return check_name(rel)
        except InvalidNameError:
            pass
    return repo.rsplit("/", 1)[-1]


def plan(client: Client, repo: str, reference: str, name: str | None, namespace: str | None = None) -> Plan:
    """Read and check what a pull of ``repo:reference`` would import.

    ``name`` is ``--name NAME[:VERSION]``; without it the name comes from the
    repository path (:func:`default_name`, ``namespace`` being the recorded
    remote's). The version is the one the config records, or the tag pulled.
    """
    from adapterhub.manifest import FileEntry, Manifest
    from adapterhub.refs import check_name, check_version, parse_target

    # --name NAME[:VERSION], as for hf:// pulls: the version given overrides the config's.
    name, name_version = parse_target(name) if name else (None, None)
    where = f"{client.host}/{repo}:{reference}"
    m, mdigest = _manifest(client, repo, reference, where)
    cfg_desc = m.get("config") or {}
    layers = m.get("layers") or []
    ann = m.get("annotations") or {}
    if not isinstance(layers, list) or not isinstance(cfg_desc, dict) or not isinstance(ann, dict):
        raise InvalidArtifactError(f"{where}: malformed manifest")
    ours = cfg_desc.get("mediaType") == CONFIG_TYPE
    if not ours and cfg_desc.get("mediaType") in IMAGE_CONFIG_TYPES:
        raise InvalidArtifactError(f"{where} is a container image, not an adapterhub artifact or a set of files")
    files = _layer_files(layers, where)
    entries = Manifest.from_entries(FileEntry(p, s, h) for p, h, s in files)  # safe, unique paths
    check_file_tree([p for p, _, _ in files], where)
    local_name = name or default_name(repo, namespace)
    warnings = []
    config: dict[str, Any] = {}
    if ours:
        config = _checked_config(client, repo, cfg_desc, files, entries.digest, where)
        claimed, version = config.get("name"), config.get("version")
        if not isinstance(claimed, str):
            raise InvalidNameError(f"{where}: the config names no artifact")
        try:
            check_name(claimed)
        except InvalidNameError as e:
            raise InvalidNameError(f"{where}: the config's name {claimed[:80]!r} is not a valid name") from e
        if claimed != local_name and not name:
            warnings.append(f"the artifact calls itself {claimed}; it is imported as {local_name}, from the "
                            "repository path (`--name NAME` imports it under another name)")
    else:
        version = None if reference == "latest" or reference.startswith("sha256:") else reference
        if version is not None:
            try:
                check_version(version)
            except InvalidNameError:
                version = None
    try:
        check_name(local_name)
    except InvalidNameError as e:
        raise InvalidNameError(f"{local_name[:80]!r} cannot be a local name", hint="pass --name NAME[:VERSION]") from e
    if name_version is not None:
        version = name_version
    if version is not None:
        check_version(version)
    return Plan(repo, reference, mdigest, ours, config, files, local_name, version, ann, warnings)
