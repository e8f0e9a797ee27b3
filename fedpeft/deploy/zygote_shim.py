"""``flwr-clientapp`` shim: ask the node's zygote for a warm ClientApp process.

Flower launches ``flwr-clientapp`` by name through ``PATH`` once per message
(FLOWER.md §9.1); :func:`fedpeft.deploy.zygote.install_shim` writes this file as an
executable named ``flwr-clientapp`` into a directory put first on the launcher's
``PATH``. It imports only the standard library (it starts in tens of milliseconds):

1. connect to ``$FEDPEFT_ZYGOTE_SOCKET`` and send argv, environment, cwd and
   descriptors 0, 1, 2; wait (up to ``$FEDPEFT_ZYGOTE_WAIT`` s, default 120) for the
   zygote's ``ready`` and answer ``go`` — only then may it fork, so a shim that gave
   up can never leave a second process running the same message;
2. the zygote forks a child that runs Flower's real ``flwr-clientapp`` main with them;
3. forward SIGTERM/SIGINT/SIGHUP to the child, and end as it ended (its exit code, or
   the same signal).

If no zygote answers or it refuses, exec the real ``flwr-clientapp`` (``$FEDPEFT_ZYGOTE_REAL``
or the next one on ``PATH``): never worse than without the zygote. Not imported by
fedpeft; it runs as a script.
"""

import json
import os
import signal
import socket
import sys
import time

SOCKET_ENV = "FEDPEFT_ZYGOTE_SOCKET"
REAL_ENV = "FEDPEFT_ZYGOTE_REAL"
NAME = "flwr-clientapp"


def real_clientapp():
    """The real ``flwr-clientapp``: ``$FEDPEFT_ZYGOTE_REAL``, else the first on PATH that
    is not this file."""
    explicit = os.environ.get(REAL_ENV)
    if explicit:
        return explicit
    me = os.path.realpath(sys.argv[0])
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(directory or ".", NAME)
        if (
            os.path.isfile(candidate)
            and os.access(candidate, os.X_OK)
            and os.path.realpath(candidate) != me
        ):
            return candidate
    return None


def fall_back(why):
    real = real_clientapp()
    if real is None:
        sys.stderr.write(f"{NAME} shim: {why}, and no real {NAME} on PATH\n")
        sys.exit(127)
    if os.environ.get("FEDPEFT_ZYGOTE_DEBUG"):
        sys.stderr.write(f"{NAME} shim: {why}; running {real}\n")
    os.execv(real, [real, *sys.argv[1:]])


def main():
    started = time.time()
    path = os.environ.get(SOCKET_ENV)
    if not path:
        fall_back(f"${SOCKET_ENV} is not set")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(5.0)
        sock.connect(path)
        request = {"op": "fork", "argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}
        socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
        # the zygote may be busy warming a task; until we say "go" it forks nothing,
        # so giving up here and running the real flwr-clientapp is safe
        sock.settimeout(float(os.environ.get("FEDPEFT_ZYGOTE_WAIT", "120")))
        reply = json.loads(sock.recv(1 << 20) or b"{}")
    except (OSError, ValueError) as err:
        sock.close()
        fall_back(f"no zygote at {path} ({err})")
    if not reply.get("ready"):
        sock.close()
        fall_back(f"the zygote refused: {reply.get('error', 'no answer')}")
    try:
        sock.send(b'{"go": true}')
        sock.settimeout(None)  # committed: from here on the zygote's child runs this message
        reply = json.loads(sock.recv(1 << 20) or b"{}")
    except (OSError, ValueError):
        reply = {}
    if "pid" not in reply:  # no fallback now: a child may exist (it dies with the zygote)
        sys.stderr.write(f"{NAME} shim: the zygote at {path} did not start the ClientApp\n")
        sys.exit(1)
    child = int(reply["pid"])
    timings = os.environ.get("FEDPEFT_CLIENT_TIMINGS")  # benchmarks: see fedpeft.timings
    if timings:
        with open(timings, "a") as handle:
            handle.write(json.dumps({"pid": child, "event": "shim-start", "time": started}) + "\n")

    def forward(signum, frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    sock.settimeout(None)
    while True:
        try:
            data = sock.recv(1 << 16)
            break
        except InterruptedError:
            continue
    status = json.loads(data) if data else {"exit": 1}  # zygote gone: the child died with it
    if "signal" in status:
        signum = int(status["signal"])
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        sys.exit(128 + signum)
    sys.exit(int(status.get("exit", 1)))


if __name__ == "__main__":
    main()
