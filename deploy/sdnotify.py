"""systemd's notify protocol without libsystemd: `READY=1`, `STATUS=`, `RELOADING=1`,
`STOPPING=1` datagrams to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace), and the
watchdog's `WATCHDOG=1` sent from the reactor at half of `$WATCHDOG_USEC`."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from twisted.application import service
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

# What systemd hands the main process; taken out of the environment so that the children
# (rsync, exec commands, sync supervisors) do not inherit them.
ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends notify datagrams to one socket; without a socket every call does nothing. A send
    that fails is logged once, never raised: systemd going away must not stop the daemon."""

    log = Logger()

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: Any) -> bool:
        """Send `KEY=value` lines (`send(READY=1, STATUS="listening")`); True once sent."""
        if self.address is None:
            return False
        data = "".join(f"{key}={value}\n" for key, value in fields.items()).encode()
        target = socket_address(self.address)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, target)
        except OSError as e:
            if not self._failed:
                self.log.warn("cannot notify systemd at {address}: {e}", address=self.address, e=e)
            self._failed = True
            return False
        self._failed = False
        return True


def socket_address(address: str) -> str | bytes:
    """`$NOTIFY_SOCKET` as a socket address: `@name` is `\\0name` in the abstract namespace."""
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


def watchdog_interval(environ: MutableMapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings (half of WATCHDOG_USEC), or None when the watchdog is off
    or meant for another process (WATCHDOG_PID)."""
    usec = environ.get("WATCHDOG_USEC", "")
    for_pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if for_pid and (not for_pid.isdigit() or int(for_pid) != pid):
        return None
    return int(usec) / 2 / 1_000_000


def take_environment(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Remove systemd's notify variables from `environ`; answer them."""
    return {name: environ.pop(name) for name in ENVIRONMENT if name in environ}


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as `RELOADING=1` wants it in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class NotifyService(service.Service):
    """Tells systemd the daemon is ready once `when_listening()` fires (not before), keeps the
    watchdog fed from the reactor, and says when it reloads and stops. Put it last in the
    daemon: it starts after everything else and is the first to stop."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        notifier: Notifier,
        when_listening: Callable[[], Any],
        describe: Callable[[], str],
        watchdog: float | None = None,
    ) -> None:
        self.clock = clock
        self.notifier = notifier
        self.when_listening = when_listening
        self.describe = describe
        self.watchdog = watchdog
        self.ready = False
        self._pings: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if not self.notifier.enabled:
            return
        self.when_listening().addCallback(self._listening)
        if self.watchdog:
            self._pings = task.LoopingCall(self.notifier.send, WATCHDOG=1)
            self._pings.clock = self.clock
            self._pings.start(self.watchdog, now=True)

    def _listening(self, port: Any) -> Any:
        if self.running:
            self.ready = True
            self.notifier.send(READY=1, STATUS=self.describe(), MAINPID=os.getpid())
        return port

    def reloading(self) -> None:
        self.notifier.send(RELOADING=1, STATUS="reloading", MONOTONIC_USEC=monotonic_usec())

    def reloaded(self, status: str) -> None:
        self.notifier.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.notifier.send(STATUS=status)

    def stopService(self) -> None:
        super().stopService()
        if self._pings is not None and self._pings.running:
            self._pings.stop()
        self._pings = None
        self.notifier.send(STOPPING=1, STATUS="stopping")
