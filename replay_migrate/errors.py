"""One root exception with subclasses that carry the process exit code (borgbackup style).

The CLI maps any :class:`ReplayMigrateError` to its ``exit_code`` and prints its message; anything
else is a bug and exits 1 with a traceback. Messages are for the operator: they name the thing that
was wrong (a file, a domain, an event) and never carry data received from a peer verbatim.
"""

from __future__ import annotations


class ReplayMigrateError(Exception):
    """Root of every error this project raises on purpose."""

    exit_code = 2


class HostError(ReplayMigrateError):
    """The host lacks something: libvirt daemon down, QEMU too old, a tool missing."""

    exit_code = 3


class VMError(ReplayMigrateError):
    """A libvirt or guest operation failed (missing domain, failed restore, guest agent silent)."""

    exit_code = 4


class NoSuchDomainError(VMError):
    """The named domain is not defined."""

    exit_code = 5


class ImageError(ReplayMigrateError):
    """A disk or memory image is missing, malformed or of the wrong kind."""

    exit_code = 6


class CheckpointError(ReplayMigrateError):
    """A checkpoint is missing, incomplete or does not match what it claims."""

    exit_code = 7


class LogFormatError(ReplayMigrateError):
    """An input log is truncated, corrupt, too large or of a future format version."""

    exit_code = 8


class ReplayError(ReplayMigrateError):
    """Replay could not proceed: an event was not echoed in time, a sync mark was not met."""

    exit_code = 9


class ProtocolError(ReplayMigrateError):
    """A peer sent a message that is malformed or not allowed in the current state."""

    exit_code = 10


class LocalProtocolError(ReplayMigrateError):
    """This side's own code drove a protocol core wrongly (a call the core's state does not allow):
    a bug here, never the peer's doing, so nothing about it is sent to the peer. The peer's
    mistakes are :class:`ProtocolError` (h11 keeps the two apart the same way)."""

    exit_code = 70


class VerificationError(ReplayMigrateError):
    """A block or a root hash did not match: nothing was written or resumed."""

    exit_code = 11


class AuthError(ReplayMigrateError):
    """The handoff service refused the credentials."""

    exit_code = 12


class TransportError(ReplayMigrateError):
    """The connection to the peer or the service failed and could not be resumed in time."""

    exit_code = 13


class WorkloadCheckError(ReplayMigrateError):
    """A workload's check (a command run in the VM after the workload or its migration) failed:
    the user's files are not what the source computed."""

    exit_code = 14


class UsageError(ReplayMigrateError):
    """The command line asked for something inconsistent."""

    exit_code = 64


class BadNameError(UsageError):
    """A name that becomes a file or folder (a checkpoint, a clone, a domain's folder) is not a
    plain name, or its path leaves the folder it belongs in: refused before anything is touched."""
