"""Run nbdkit as the child of a small process that kills it by SIGKILL when the storage
server dies, however the server dies.

    python -m driver.storage.watchdog LISTEN_FD nbdkit ARGS...
        stdin: the read end of a pipe whose write end only the server holds
        LISTEN_FD: the server's listening socket, handed to nbdkit by socket activation

nbdkit sets its own parent-death signal to SIGTERM (seen with strace, also in the
foreground), and on SIGTERM it shuts down gracefully: requests that arrive before it exits
are answered with ESHUTDOWN, which a node's filesystem sees as EIO. So nbdkit's parent must
not be the server: it is this process, which outlives the server until nbdkit is gone. End
of file on stdin (the server exited, also by SIGKILL) or SIGTERM (the server stops it)
make it send SIGKILL; a node's NBD client then reconnects and resends without an error.
The exit status is nbdkit's, as a shell would report it.

The listening socket is the server's, not nbdkit's (systemd's socket-activation protocol:
the socket as fd 3, LISTEN_FDS=1, LISTEN_PID=nbdkit's pid), so it stays open while nbdkit is
restarted: a client that reconnects meanwhile waits in the backlog and is served by the
next nbdkit, instead of being refused and retrying a second later.
"""

import os
import signal
import subprocess
import sys
import threading

SD_LISTEN_FDS_START = 3


def _activation_env() -> None:
    """In the child, before exec (this process is single-threaded then): LISTEN_PID must be
    nbdkit's own pid, which only the child knows."""
    os.environ["LISTEN_PID"] = str(os.getpid())


def main() -> int:
    listen_fd, argv = int(sys.argv[1]), sys.argv[2:]
    if listen_fd != SD_LISTEN_FDS_START:
        os.dup2(listen_fd, SD_LISTEN_FDS_START)
        os.close(listen_fd)
    os.environ["LISTEN_FDS"] = "1"
    nbdkit = None
    stop_asked = threading.Event()

    def kill_nbdkit(*_):
        stop_asked.set()
        if nbdkit is not None:
            try:
                nbdkit.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    # Before nbdkit exists: a SIGTERM from the server's stop must never end this process by
    # the default action, which would leave nbdkit to its own parent-death SIGTERM.
    signal.signal(signal.SIGTERM, kill_nbdkit)
    nbdkit = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=(SD_LISTEN_FDS_START,),
                              preexec_fn=_activation_env)
    if stop_asked.is_set():
        kill_nbdkit()

    def await_server_exit():
        while os.read(0, 4096):
            pass
        kill_nbdkit()

    threading.Thread(target=await_server_exit, daemon=True).start()
    returncode = nbdkit.wait()
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    sys.exit(main())
