"""systemd's service protocol, from the standard library only.

- :class:`Notifier` sends ``sd_notify(3)`` datagrams (``READY=1``, ``STATUS=…``,
  ``WATCHDOG=1``, ``STOPPING=1``, ``EXTEND_TIMEOUT_USEC=…``) to ``$NOTIFY_SOCKET``: an
  AF_UNIX SOCK_DGRAM address, in the abstract namespace when it starts with ``@``. Without
  ``NOTIFY_SOCKET`` every call is a no-op, so the daemon runs the same outside systemd.
- :func:`watchdog_interval_s` reads ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, which must be
  ours when set): how often to ping, i.e. half the watchdog timeout.
- :func:`listen_socket` takes the socket systemd passed by socket activation
  (``$LISTEN_PID`` = our pid, ``$LISTEN_FDS`` ≥ 1, descriptors from 3), as ``sd_listen_fds``
  does, and removes those variables so that children do not take them too.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends notifications to the service manager; a no-op without ``NOTIFY_SOCKET``."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if raw.startswith("@"):
            self.address = b"\0" + raw[1:].encode()
        elif raw.startswith("/"):
            self.address = raw
        elif raw:
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket address; not notifying", raw)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=value``) as one datagram. True if it was sent. Never raises:
        a service manager that went away must not take the daemon down with it."""
        if self.address is None:
            return False
        message = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError as e:
            log.warning("sd_notify to %r failed: %s", self.address, e)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, or None when no watchdog is asked of us."""
    env = os.environ if env is None else env
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


def listen_socket(env: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The listening AF_UNIX stream socket passed by socket activation, or None when none was
    passed to this process. Only the first descriptor is used (the unit passes one); the
    ``LISTEN_*`` variables are removed either way once they were meant for us."""
    env = os.environ if env is None else env
    if env.get("LISTEN_PID", "") != str(os.getpid()):
        return None
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if count < 1:
        return None
    if count > 1:
        log.warning("socket activation passed %d descriptors; using fd %d only", count,
                    SD_LISTEN_FDS_START)
    fd = SD_LISTEN_FDS_START
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise OSError(f"socket activation: fd {fd} is not a socket")
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise OSError(f"socket activation: fd {fd} is not an AF_UNIX stream socket")
    sock.setblocking(False)
    return sock
