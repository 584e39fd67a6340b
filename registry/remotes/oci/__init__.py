"""Push, pull and search adapterhub artifacts on OCI registries (distribution spec v1.1).

- :mod:`.media`: media types, names, limits (what an artifact looks like);
- :mod:`.auth`: credentials and the answer to a 401 challenge;
- :mod:`.client`: the transport and the registry calls;
- :mod:`.transfer`: blob bytes up and down (hashed, resumed);
- :mod:`.push`, :mod:`.pull` (with :mod:`.plan`), :mod:`.referrers`, :mod:`.search`;
- :mod:`.staging`: the pull staging area that ``fsck`` and ``gc`` see.
"""

from __future__ import annotations

from adapterhub.registry.remotes.oci.client import Client, client_for
from adapterhub.registry.remotes.oci.media import (
    ARTIFACT_TYPES,
    CONFIG_TYPE,
    FILE_TYPE,
    INDEX_TYPE,
    MANIFEST_TYPE,
    SIGNATURE_TYPE,
    TITLE,
    check_oci_tag,
    check_repository,
)
from adapterhub.registry.remotes.oci.pull import pull
from adapterhub.registry.remotes.oci.push import push
from adapterhub.registry.remotes.oci.search import search
from adapterhub.registry.remotes.oci.staging import (
    STAGING_MAX_AGE_S,
    StagedLeftover,
    remove_staging,
    stale_staging,
    staging_root,
)

__all__ = [
    "ARTIFACT_TYPES", "CONFIG_TYPE", "FILE_TYPE", "INDEX_TYPE", "MANIFEST_TYPE", "SIGNATURE_TYPE", "TITLE",
    "Client", "STAGING_MAX_AGE_S", "StagedLeftover", "check_oci_tag", "check_repository", "client_for", "pull",
    "push", "remove_staging", "search", "stale_staging", "staging_root",
]
