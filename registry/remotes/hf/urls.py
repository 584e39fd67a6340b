"""Hub URLs: ``hf://org/repo[@revision]`` for a repo, ``hf://org`` for a search, and
the registry names and Hub tags derived from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterhub.errors import InvalidNameError
from adapterhub.registry.remotes.hf.layout import SCHEME

_REVISION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/+-]{0,199}")


@dataclass(frozen=True)
class HubRepo:
    """A parsed ``hf://org/repo[@revision]``."""

    repo_id: str
    revision: str | None = None

    @property
    def url(self) -> str:
        return SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "")

    def __str__(self) -> str:
        return self.url


def parse_url(url: str) -> HubRepo:
    """``hf://org/repo[@revision]`` -> ``HubRepo``; names are checked with huggingface_hub's validator.

    >>> parse_url("hf://team/qa-lora@v3")
    HubRepo(repo_id='team/qa-lora', revision='v3')
    """
    if not url.startswith(SCHEME):
        raise InvalidNameError(f"{url!r} is not a Hugging Face Hub URL", hint="write hf://ORG/REPO[@REVISION]")
    repo_id, at, revision = url[len(SCHEME):].partition("@")
    if repo_id.count("/") != 1:
        raise InvalidNameError(
            f"invalid Hub repo {url!r}: expected hf://ORG/REPO", hint="for example hf://my-org/qa-lora"
        )
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InvalidNameError(f"invalid Hub repo id {repo_id!r}: {str(e).splitlines()[0]}") from None
    if at and not (_REVISION_RE.fullmatch(revision) and ".." not in revision and not revision.endswith((".", "/"))):
        raise InvalidNameError(
            f"invalid revision {revision!r} in {url!r}", hint="a branch, tag or commit: hf://org/repo@main, @v3, @<sha>"
        )
    return HubRepo(repo_id, revision if at else None)


def parse_org_url(url: str) -> tuple[str, str | None]:
    """``hf://org`` or ``hf://org/prefix`` -> (org, search text or None)."""
    if not url.startswith(SCHEME):
        raise InvalidNameError(f"{url!r} is not a Hugging Face Hub URL", hint="write hf://ORG")
    org, _, rest = url[len(SCHEME):].strip("/").partition("/")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", org) or "--" in org or ".." in org:
        raise InvalidNameError(f"invalid Hub organisation in {url!r}", hint="write hf://ORG")
    return org, rest or None


def version_tag(version: str) -> str:
    """The Hub tag of a registry version: ``3`` -> ``v3``, ``1.2.0`` -> ``v1.2.0``, ``beta`` -> ``beta``."""
    return f"v{version}" if version[:1].isdigit() else version


def name_for(repo_id: str) -> str:
    """A registry name derived from a Hub repo id: ``Org/Qa_LoRA`` -> ``org/qa_lora``."""
    from adapterhub.refs import check_name

    parts = []
    for part in repo_id.lower().split("/"):
        part = re.sub(r"[^a-z0-9._-]", "-", part).lstrip("._-")
        parts.append(part or "hub")
    return check_name("/".join(parts)[:128])
