"""Run nbdkit as the child of a small process that kills it by SIGKILL when the storage
server dies, however the server dies.

    python -m driver.storage.watchdog nbdkit ARGS...
        stdin: the read end of a pipe whose write end only the server holds

nbdkit sets its own parent-death signal to SIGTERM (seen with strace, also in the
foreground), and on SIGTERM it shuts down gracefully: requests that arrive before it exits
are answered with ESHUTDOWN, which a node's filesystem sees as EIO. So nbdkit's parent must
not be the server: it is this process, which outlives the server until nbdkit is gone. End
of file on stdin (the server exited, also by SIGKILL) or SIGTERM (the server stops it)
make it send SIGKILL; a node's NBD client then reconnects and resends without an error.
The exit status is nbdkit's, as a shell would report it.
"""

import os
import signal
import subprocess
import sys
import threading


def main() -> int:
    nbdkit = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)

    def kill_nbdkit(*_):
        try:
            nbdkit.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, kill_nbdkit)

    def await_server_exit():
        while os.read(0, 4096):
            pass
        kill_nbdkit()

    threading.Thread(target=await_server_exit, daemon=True).start()
    returncode = nbdkit.wait()
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    sys.exit(main())
