"""Errors and their exit codes.

Every error a user can cause is an ``AdapterhubError`` subclass. The CLI maps
them to a one-line message and the exit code below (documented in README.md):

====  ==========================================================
0     success
1     unexpected error (a bug: set ADAPTERHUB_DEBUG=1 for the traceback)
2     bad command-line usage (click)
3     not found: unknown ref, missing path
4     invalid input: not an artifact, malformed file, invalid name, unsafe path
5     conflict: version already holds other content, destination not empty
6     integrity: a hash does not match, fsck found problems
7     storage: disk full, permission denied, registry locked
8     trust: unsigned or untrusted artifact under a policy, bad signature,
      revoked or expired key, missing key passphrase
9     remote: unreachable, authentication failed or refused, an error
      from the remote registry
10    check --strict: compatible, but with warnings (``check`` exits 1 when
      the adapter is incompatible)
130   interrupted (Ctrl-C)
====  ==========================================================
"""

from __future__ import annotations


class AdapterhubError(Exception):
    """Base class for errors the user can act on."""

    exit_code = 1
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class UsageError(AdapterhubError):
    """Options that do not go together (int8 with double quantization, ...)."""

    exit_code = 2


class NotFoundError(AdapterhubError):
    exit_code = 3


class InvalidArtifactError(AdapterhubError):
    """The input is not a readable artifact (or a part of it is malformed)."""

    exit_code = 4


class InvalidNameError(InvalidArtifactError):
    """A name, version, tag or ref that does not follow the grammar."""


class UnsafePathError(InvalidArtifactError):
    """A path that would escape its directory (``..``, absolute, symlink)."""


class ConflictError(AdapterhubError):
    exit_code = 5


class IntegrityError(AdapterhubError):
    exit_code = 6


class StorageError(AdapterhubError):
    exit_code = 7


class TrustError(AdapterhubError):
    """A signature or provenance check failed, or a policy refused an artifact.

    Raised fail-closed: nothing the check was about is marked trusted.
    """

    exit_code = 8


class RemoteError(AdapterhubError):
    """A remote (OCI registry, Hugging Face Hub) is unreachable or answered with an error."""

    exit_code = 9


class RemoteAuthError(RemoteError):
    """The remote wants credentials, or refused the ones given (401, 403)."""


#: ``adapterhub check --strict`` when the adapter fits its base but a rule warns.
CHECK_WARNINGS_EXIT = 10

EXIT_CODES = {
    0: "success",
    1: "unexpected error",
    2: "bad usage",
    3: "not found",
    4: "invalid input",
    5: "conflict",
    6: "integrity failure",
    7: "storage failure",
    8: "trust failure",
    9: "remote failure",
    10: "check warnings (--strict)",
    130: "interrupted",
}
