"""Remotes: named OCI registries and Hugging Face Hub orgs, and the dispatch to them.

The public face of the remote side, one module per concern:

- :mod:`.urls`: ``oci://`` and ``hf://`` URLs;
- :mod:`.store`: the ``remotes`` table (name -> URL) and the search cache,
  the only SQL about remotes;
- :mod:`.credentials`: where credentials come from (never the index);
- :mod:`.validate`: checks on what a remote's metadata claims;
- :mod:`.gate`: the trust gate an import is given by its caller (remotes never
  import ``adapterhub.trust``);
- :mod:`.dispatch` and :mod:`.search`: ``push``/``pull``/``search`` to the
  right side, :mod:`.oci` or :mod:`.hf`.

>>> parse_url("oci://127.0.0.1:5000/team").repository("qa-lora")
'team/qa-lora'
"""

from __future__ import annotations

from adapterhub.registry.remotes.credentials import Credentials, credential_source, credentials
from adapterhub.registry.remotes.dispatch import Endpoint, check_credentials, pull_remote, push_remote, resolve
from adapterhub.registry.remotes.gate import Bundle, SignatureCheck, TrustGate
from adapterhub.registry.remotes.search import filter_rows, search_remote
from adapterhub.registry.remotes.store import Remote, add, check_remote_name, for_url, get, login, logout, ls, rm
from adapterhub.registry.remotes.urls import SCHEMES, RemoteURL, is_url, parse_url
from adapterhub.registry.remotes.validate import check_file_path, check_file_tree, check_lineage, check_text

__all__ = [
    "SCHEMES", "Bundle", "Credentials", "Endpoint", "Remote", "RemoteURL", "SignatureCheck", "TrustGate", "add",
    "check_credentials", "check_file_path", "check_file_tree", "check_lineage", "check_remote_name", "check_text",
    "credential_source", "credentials", "filter_rows", "for_url", "get", "is_url", "login", "logout", "ls", "parse_url", "pull_remote",
    "push_remote", "resolve", "rm", "search_remote",
]
