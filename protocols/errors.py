"""The one error hierarchy of teammesh.

Every error a user can see is a ``TeammeshError``; its message says what happened and
what to do about it, in one line.

    TeammeshError
    ├── ConfigError              bad config key or value (names the key and the fix)
    ├── ProtocolError
    │   ├── LocalProtocolError   we were about to send something invalid: a bug on our side
    │   └── RemoteProtocolError  a peer sent something invalid: drop or penalise the peer
    │       ├── FrameTooLarge
    │       ├── MalformedMessage
    │       └── BadSignature
    ├── MembershipError          certificates, invites, revocations
    │   ├── NotAMember
    │   ├── InviteError          expired, used, unknown or malformed invite
    │   └── EnrollmentError      no admin reachable, refused enrollment
    ├── NodeNotRunning           the CLI could not reach its daemon
    ├── TaskError                a task failed, or cannot run
    │   ├── UnknownKind
    │   ├── NoCapacity
    │   ├── TaskLimitExceeded    timeout, CPU time or memory limit
    │   └── ResultRejected       forged/altered result, or replicas disagree
    └── StorageError
"""

from __future__ import annotations


class TeammeshError(Exception):
    """Base of every error teammesh raises on purpose."""


class ConfigError(TeammeshError):
    pass


class ProtocolError(TeammeshError):
    pass


class LocalProtocolError(ProtocolError):
    pass


class RemoteProtocolError(ProtocolError):
    pass


class FrameTooLarge(RemoteProtocolError):
    pass


class MalformedMessage(RemoteProtocolError):
    pass


class BadSignature(RemoteProtocolError):
    pass


class MembershipError(TeammeshError):
    pass


class NotAMember(MembershipError):
    pass


class InviteError(MembershipError):
    pass


class EnrollmentError(MembershipError):
    pass


class NodeNotRunning(TeammeshError):
    pass


class TaskError(TeammeshError):
    pass


class UnknownKind(TaskError):
    pass


class NoCapacity(TaskError):
    pass


class TaskLimitExceeded(TaskError):
    pass


class ResultRejected(TaskError):
    pass


class StorageError(TeammeshError):
    pass


class MirrorError(StorageError):
    """The mirror refused a request."""


class MirrorUnavailable(MirrorError):
    """The mirror's endpoint cannot be reached."""


class MirrorAuthError(MirrorError):
    """The mirror rejected our credentials."""


class MirrorCorrupt(MirrorError):
    """An object's bytes do not hash to the CID it is stored under."""


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc`` however deeply trio's nurseries grouped them
    (``[exc]`` for a plain exception), so callers can judge the errors one by one."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]
