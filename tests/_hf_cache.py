"""A Hugging Face cache laid out on disk as huggingface_hub leaves it, for offline import tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

COMMIT = "c0ffee" + "0" * 34


def cache_snapshot(cache: Path, repo_id: str, files: dict[str, bytes], *, commit: str = COMMIT,
                   refs: tuple[str, ...] = ("main",), tree: bool = True, shared: bool = False) -> Path:
    """Lay out ``files`` as huggingface_hub leaves a downloaded commit in its cache.

    ``shared``: the repo's blobs are links into the cache-wide store
    ``<cache>/blobs/<2 hex>/<hash>``, as newer huggingface_hub versions keep
    Xet-stored files.
    """
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        etag = hashlib.sha256(data).hexdigest()
        if shared:
            store = cache / "blobs" / etag[:2] / etag
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_bytes(data)
            (repo / "blobs" / etag).symlink_to(os.path.relpath(store, repo / "blobs"))
        else:
            (repo / "blobs" / etag).write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / etag, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    if tree:
        try:  # the tree listing lets huggingface_hub tell a complete snapshot from a partial one
            from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
        except ImportError:
            pass
        else:
            write_tree_cache(str(repo), commit, {
                rel: TreeCacheEntry(size=len(data), blob_id=hashlib.sha1(data).hexdigest()) for rel, data in files.items()
            })
    return snap
