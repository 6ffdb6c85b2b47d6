"""Kill a process when the storage server dies, however it dies.

    python -m driver.storage.watchdog PID    (stdin: the read end of a pipe the server holds)

nbdkit sets its own parent-death signal to SIGTERM, and on SIGTERM it shuts down gracefully,
failing the requests in flight, which a node sees as EIO. This watchdog waits for end of
file on its stdin, which happens when the server's end of the pipe closes (also on SIGKILL),
and then sends SIGKILL instead: a node's NBD client reconnects after that without an error.
"""

import os
import signal
import sys


def main() -> int:
    pid = int(sys.argv[1])
    while sys.stdin.buffer.read(4096):
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
