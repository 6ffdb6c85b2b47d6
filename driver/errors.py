"""Typed errors raised by backends and node steps, and the one table mapping them to gRPC codes.

Code below the CSI services raises these; `driver.rpc` turns them into a gRPC status.
Anything else that escapes becomes INTERNAL and is logged with its traceback.
"""

import grpc


class PolyvolError(Exception):
    """Base class: the message is shown to the CSI client, so it should say what to change."""


class InvalidArgument(PolyvolError):
    pass


class NotFound(PolyvolError):
    pass


class AlreadyExists(PolyvolError):
    pass


class ResourceExhausted(PolyvolError):
    pass


class OutOfRange(PolyvolError):
    pass


class FailedPrecondition(PolyvolError):
    pass


class Aborted(PolyvolError):
    """Another operation holds the volume; the client should retry later."""


class PermissionDenied(PolyvolError):
    pass


class Unauthenticated(PolyvolError):
    pass


class Unavailable(PolyvolError):
    """A backend (storage server, Ceph cluster) cannot be reached right now."""


class Unimplemented(PolyvolError):
    pass


class DeadlineExceeded(PolyvolError):
    pass


class CommandFailed(PolyvolError):
    """An external command exited non-zero; becomes INTERNAL (its stderr is in the log)."""

    def __init__(self, argv, returncode, stderr):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else "no stderr"
        super().__init__(f"{argv[0]} exited with {returncode}: {tail}")


class CommandTimedOut(DeadlineExceeded):
    def __init__(self, argv, timeout):
        self.argv = list(argv)
        super().__init__(f"{argv[0]} did not finish within {timeout:g}s and was killed")


STATUS_OF = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Aborted: grpc.StatusCode.ABORTED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    CommandFailed: grpc.StatusCode.INTERNAL,
}


def error_for_status(code: grpc.StatusCode, message: str) -> PolyvolError:
    """The typed error for a gRPC status that another polyvol component (a storage server)
    returned, so it passes through our own services with the same code and message."""
    for cls, status in STATUS_OF.items():
        if status == code and cls is not CommandFailed:
            return cls(message)
    return PolyvolError(f"{code.name}: {message}")


def status_of(error: BaseException) -> grpc.StatusCode:
    """The gRPC code for an error: the nearest typed ancestor in STATUS_OF, else INTERNAL."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL
