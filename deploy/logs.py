"""The daemons' own logs, built on `twisted.logger` observers: the error log (level-filtered),
the access log in the original's line format, and an optional JSON-lines audit log. Each goes to
a file whose name may hold strftime patterns (a new file per period: `%Y%m%d%H` rolls hourly)
or to `syslog`."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import syslog
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.application import service
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    eventAsText,
    formatEvent,
    globalLogPublisher,
)
from zope.interface import implementer

# The original's defaults (both daemons shared them).
DEFAULT_ERROR_PATH = "/var/log/deploy/error.log"
DEFAULT_ACCESS_PATH = "/var/log/deploy/access.log"
SYSLOG = "syslog"

# The original's eight syslog-style levels onto Twisted's five. Twisted has no notice: a
# threshold of notice keeps warnings and up, as it would in syslog.
LEVELS: dict[str, LogLevel] = {
    "emerg": LogLevel.critical,
    "alert": LogLevel.critical,
    "crit": LogLevel.critical,
    "error": LogLevel.error,
    "warn": LogLevel.warn,
    "notice": LogLevel.warn,
    "info": LogLevel.info,
    "debug": LogLevel.debug,
}
SYSLOG_PRIORITY: dict[LogLevel, int] = {
    LogLevel.critical: syslog.LOG_CRIT,
    LogLevel.error: syslog.LOG_ERR,
    LogLevel.warn: syslog.LOG_WARNING,
    LogLevel.info: syslog.LOG_INFO,
    LogLevel.debug: syslog.LOG_DEBUG,
}

ACCESS_FORMAT = '{remote_addr} {remote_host} [{when}] "{request}" {status} {size}'
ACCESS_TIME = "%Y/%m/%d %H:%M:%S"
# Held error-log events before the files open (after privileges are dropped).
MAX_HELD_EVENTS = 1000
# Longest text value an audit record keeps.
MAX_AUDIT_TEXT = 4096
# How often a file's name is checked against the open file (moved away by logrotate?).
REOPEN_CHECK_SECONDS = 1.0


def log_level(name: str) -> LogLevel:
    """The Twisted level for one of the original's level names (`emerg`..`debug`)."""
    try:
        return LEVELS[name]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}; one of {', '.join(LEVELS)}") from None


def api_key_id(api_key: str | None) -> str | None:
    """What the audit log says of an API key: the first 12 hex digits of its sha256, never the
    key (`printf %s KEY | sha256sum | cut -c1-12` gives the same)."""
    if not api_key:
        return None
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()[:12]


# --------------------------------------------------------------------------- destinations


class Destination(Protocol):
    def write(self, line: str, level: LogLevel) -> None: ...

    def close(self) -> None: ...


class RollingFile:
    """Appends lines to the file `pattern` names at the time of each line: with strftime
    patterns (`agent_access.%Y%m%d%H.log`) each period gets its own file, opened when its first
    line comes. A file moved or deleted under us (logrotate) is reopened within a second, so
    rotation needs no signal. Missing parent directories are created."""

    def __init__(
        self,
        pattern: str,
        *,
        now: Callable[[], float] = time.time,
        mode: int = 0o640,
        check_interval: float = REOPEN_CHECK_SECONDS,
    ) -> None:
        self.pattern = pattern
        self.now = now
        self.mode = mode
        self.check_interval = check_interval
        self.path: str | None = None
        self._fd: int | None = None
        self._checked = 0.0
        self._failed_path: str | None = None

    def path_for(self, t: float) -> str:
        if "%" not in self.pattern:
            return self.pattern
        return time.strftime(self.pattern, time.localtime(t))

    def write(self, line: str, level: LogLevel = LogLevel.info) -> None:
        t = self.now()
        path = self.path_for(t)
        try:
            if self._fd is None or path != self.path or self._moved(t):
                self._open(path)
            assert self._fd is not None
            os.write(self._fd, line.encode("utf-8", "backslashreplace"))
            self._failed_path = None
        except OSError as e:
            self._report(path, e)

    def _moved(self, t: float) -> bool:
        if t - self._checked < self.check_interval:
            return False
        self._checked = t
        assert self._fd is not None and self.path is not None
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return True
        mine = os.fstat(self._fd)
        return (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino)

    def _open(self, path: str) -> None:
        self.close()
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, mode=0o750, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        self.path = path
        self._checked = self.now()

    def _report(self, path: str, error: OSError) -> None:
        # Said once per file on the process's real stderr: sys.stderr may be twistd's log, and
        # an error about the log must not feed itself.
        if self._failed_path == path:
            return
        self._failed_path = path
        self.close()
        message = f"deploy: cannot write log file {path}: {error.strerror or error}\n"
        try:
            os.write(2, message.encode("utf-8", "backslashreplace"))
        except OSError:
            pass

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


class SyslogDestination:
    """Lines to the local syslog (facility daemon) with the priority of their level."""

    _opened_as: str | None = None

    def __init__(self, ident: str, facility: int = syslog.LOG_DAEMON) -> None:
        self.ident = ident
        self.facility = facility

    def write(self, line: str, level: LogLevel = LogLevel.info) -> None:
        # openlog is per process; every destination of a daemon shares its ident.
        if SyslogDestination._opened_as != self.ident:
            syslog.openlog(self.ident, syslog.LOG_PID, self.facility)
            SyslogDestination._opened_as = self.ident
        priority = SYSLOG_PRIORITY.get(level, syslog.LOG_INFO)
        for part in line.rstrip("\n").split("\n"):
            syslog.syslog(self.facility | priority, part)

    def close(self) -> None:
        pass


def open_destination(path: str, ident: str, *, now: Callable[[], float] = time.time) -> Destination:
    """`syslog`, or a (possibly strftime-patterned) file path."""
    if path == SYSLOG:
        return SyslogDestination(ident)
    return RollingFile(path, now=now)


# --------------------------------------------------------------------------- observers


def format_error_event(event: LogEvent) -> str:
    """`[YYYY/MM/DD HH:MM:SS] [level] (namespace) text`, the traceback after it when there is
    one: the access log's time format, so both logs line up."""
    when = time.strftime(ACCESS_TIME, time.localtime(event.get("log_time", time.time())))
    level = event.get("log_level", LogLevel.info)
    namespace = event.get("log_namespace", "-")
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    return f"[{when}] [{level.name}] ({namespace}) {text}\n"


@implementer(ILogObserver)
class ErrorLogObserver:
    """Writes error-log events to a destination; until `release()` it only holds them (at most
    MAX_HELD_EVENTS), so start-up warnings logged before the files can be opened (before the
    daemon drops its privileges) still reach the file."""

    def __init__(self, open_destination: Callable[[], Destination]) -> None:
        self._open = open_destination
        self.destination: Destination | None = None
        self._held: deque[LogEvent] = deque(maxlen=MAX_HELD_EVENTS)

    def __call__(self, event: LogEvent) -> None:
        if self.destination is None:
            self._held.append(event)
            return
        self.destination.write(format_error_event(event), event.get("log_level", LogLevel.info))

    def release(self) -> None:
        if self.destination is None:
            self.destination = self._open()
        while self._held:
            self(self._held.popleft())

    def close(self) -> None:
        if self.destination is not None:
            self.destination.close()


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one line: `formatEvent` of its format (access), or `render(event)`."""

    def __init__(
        self, destination: Destination, render: Callable[[LogEvent], str] = formatEvent
    ) -> None:
        self.destination = destination
        self.render = render

    def __call__(self, event: LogEvent) -> None:
        self.destination.write(self.render(event) + "\n", event.get("log_level", LogLevel.info))


def _escape(text: str) -> str:
    """Printable ASCII as is; `"` and `\\` backslashed; anything else as an escape, so a
    request line cannot forge or break a log line."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif " " <= c <= "~":
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def access_fields(proto: Any, response: Any, now: float) -> dict[str, Any]:
    """The fields of one access line. REMOTE_HOST is the peer address: a reverse lookup would
    block the event loop (or delay the line), and the original logged the address too when no
    name was known."""
    peer = getattr(proto, "peer", "") or "-"
    return {
        "remote_addr": peer,
        "remote_host": getattr(proto, "remote_host", None) or peer,
        "when": time.strftime(ACCESS_TIME, time.localtime(now)),
        "request": _escape(getattr(proto, "request_line", "") or "-"),
        "status": response.status,
        "size": len(response.body),
    }


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_AUDIT_TEXT:
        return value[:MAX_AUDIT_TEXT] + "..."
    return value


def audit_record(proto: Any, response: Any, daemon: str, now: float) -> dict[str, Any]:
    """One audit line: who (peer, API key id), what (order, options, args), the answer's
    status and size, and how long from connect to answer."""
    request = getattr(proto, "request", None)
    opened = getattr(proto, "opened_at", None)
    record: dict[str, Any] = {
        "time": datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(
            timespec="milliseconds"
        ),
        "daemon": daemon,
        "peer": getattr(proto, "peer", ""),
        "method": request.method if request is not None else None,
        "path": request.path if request is not None else None,
    }
    for key, value in (getattr(proto, "audit", None) or {}).items():
        record[key] = _clip(value)
    record["status"] = response.status
    record["bytes"] = len(response.body)
    record["duration"] = round(time.monotonic() - opened, 3) if opened is not None else None
    return record


def proxy_audit(request: Any, granted_hosts: Callable[[str, str], list[str]]) -> dict[str, Any]:
    """What the proxy puts in a request's audit record: the order and its target, the API key's
    id and how many hosts the key grants for it (0 when it grants none)."""
    try:
        hosts = len(granted_hosts(request.api_key, request.args))
    except Exception:
        hosts = 0
    return {
        "order": request.order,
        "options": request.options,
        "args": request.args,
        "apiKeyId": api_key_id(request.api_key),
        "hosts": hosts,
    }


# --------------------------------------------------------------------------- the service


class LogService(service.Service):
    """The daemon's log files. Built in `makeService` (the error log then starts holding
    events); files open in `startService`, that is after privileges are dropped, so they are
    created by the user the daemon runs as."""

    def __init__(
        self,
        *,
        error_path: str | None,
        error_level: LogLevel,
        access_path: str | None,
        audit_path: str | None,
        factory: Any,
        daemon: str,
        now: Callable[[], float] = time.time,
        publisher: LogPublisher = globalLogPublisher,
    ) -> None:
        self.daemon = daemon
        self.ident = f"deploy-{daemon}"
        self.now = now
        self.factory = factory
        self.publisher = publisher
        self.error_path = error_path
        self.access_path = access_path
        self.audit_path = audit_path
        self.error: ErrorLogObserver | None = None
        self._error_filter: FilteringLogObserver | None = None
        self._access: LineObserver | None = None
        self._audit: LineObserver | None = None
        self.access_log: Logger | None = None
        self.audit_log: Logger | None = None
        if error_path:
            self.error = ErrorLogObserver(lambda: open_destination(error_path, self.ident, now=now))
            self._error_filter = FilteringLogObserver(
                self.error, [LogLevelFilterPredicate(defaultLogLevel=error_level)]
            )
            publisher.addObserver(self._error_filter)

    @property
    def paths(self) -> list[str]:
        """The file paths (patterns) this service writes; not `syslog`."""
        candidates = [self.error_path, self.access_path, self.audit_path]
        return [p for p in candidates if p and p != SYSLOG]

    def startService(self) -> None:
        super().startService()
        if self.error is not None:
            self.error.release()
        if self.access_path:
            access = open_destination(self.access_path, self.ident, now=self.now)
            self._access = LineObserver(access)
            self.access_log = Logger(namespace="deploy.access", observer=self._access)
        if self.audit_path:
            self._audit = LineObserver(
                open_destination(self.audit_path, self.ident, now=self.now),
                render=lambda event: json.dumps(event["audit"], ensure_ascii=False),
            )
            self.audit_log = Logger(namespace="deploy.audit", observer=self._audit)
        if self.access_log is not None or self.audit_log is not None:
            self.factory.observers.append(self.response_sent)

    def stopService(self) -> None:
        super().stopService()
        observers = getattr(self.factory, "observers", [])
        if self.response_sent in observers:
            observers.remove(self.response_sent)
        if self._error_filter is not None:
            self.publisher.removeObserver(self._error_filter)
            self._error_filter = None
        if self.error is not None:
            self.error.close()
        for observer in (self._access, self._audit):
            if observer is not None:
                observer.destination.close()

    def reopen(self) -> None:
        """Close the log files; each opens again under its name at its next line (SIGHUP, for
        logrotate without copytruncate)."""
        destinations = [o.destination for o in (self._access, self._audit) if o is not None]
        if self.error is not None and self.error.destination is not None:
            destinations.append(self.error.destination)
        for destination in destinations:
            destination.close()

    def response_sent(self, proto: Any, response: Any) -> None:
        """The factory's observer: one access line and one audit record per answer."""
        now = self.now()
        if self.access_log is not None:
            self.access_log.info(ACCESS_FORMAT, **access_fields(proto, response, now))
        if self.audit_log is not None:
            self.audit_log.info("{audit}", audit=audit_record(proto, response, self.daemon, now))


def build_log_service(
    *,
    log_write: bool,
    log_error_level: str,
    log_error_path: str | None,
    log_access_path: str | None,
    audit_log_path: str | None,
    factory: Any,
    daemon: str,
    now: Callable[[], float] = time.time,
    publisher: LogPublisher = globalLogPublisher,
) -> LogService:
    """The logs the options ask for. `log_write` turns the original's two logs on (with their
    default paths when none is given); the audit log only needs its path."""
    error_path = (log_error_path or DEFAULT_ERROR_PATH) if log_write else None
    access_path = (log_access_path or DEFAULT_ACCESS_PATH) if log_write else None
    return LogService(
        error_path=error_path,
        error_level=log_level(log_error_level),
        access_path=access_path,
        audit_path=audit_log_path or None,
        factory=factory,
        daemon=daemon,
        now=now,
        publisher=publisher,
    )


def current_files(paths: Iterable[str], now: float | None = None) -> list[str]:
    """The files `paths` (strftime patterns allowed) name now; syslog has none."""
    t = time.time() if now is None else now
    files = []
    for path in paths:
        if not path or path == SYSLOG:
            continue
        name = time.strftime(path, time.localtime(t)) if "%" in path else path
        files.append(os.path.abspath(name))
    return list(dict.fromkeys(files))


def log_directories(paths: Iterable[str], now: float | None = None) -> list[str]:
    """The directories the log files of `paths` go to now."""
    return list(dict.fromkeys(os.path.dirname(f) for f in current_files(paths, now)))
