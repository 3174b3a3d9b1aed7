"""The typed settings of agent and proxy: the `[server]` section, rsync groups, the proxy's
`[client]` section and the whole of each daemon's config, as `deploy.config` reads them."""

from __future__ import annotations

from dataclasses import dataclass, field

from deploy.auth import DEFAULT_KEY_CIPHER
from deploy.keyring import AgentAccess
from deploy.policy import Policy


@dataclass
class ServerSettings:
    addr: str = "0.0.0.0"
    port: int = 3440
    backlog: int = 128
    socket_timeout: float = 5.0
    socket_accept_filter: bool = False
    max_prefork: int = 0
    max_requests_per_child: int = 0
    max_process_timeout: float = 0.0
    log_write: bool = False
    log_error_level: str = "info"
    log_error_path: str | None = None
    log_access_path: str | None = None
    audit_log_path: str | None = None
    # agent: None means DEFAULT_KEY_CIPHER; proxy: None means no agent-style auth is required
    key_cipher: str | None = None
    legacy_auth: bool = False
    auth_window: float = 60.0
    ssl: bool = False
    ssl_private_key: str | None = None
    ssl_certificate: str | None = None
    ssl_client_ca: str | None = None
    process_name: str | None = None
    user: str | None = None
    group: str | None = None
    state_path: str | None = None
    rkill_grace: float = 5.0
    # agent: bounds on what a request may start (issue 12): how long a dry run (status, rlist)
    # may take even when max_process_timeout is 0, and whether an inline source may be HOST:path
    # (rsync then runs the remote shell, ssh, as the agent's user)
    dry_run_timeout: float = 300.0
    allow_inline_remote_shell: bool = False
    # how long a sync retries a source that says `max connections` (group key beats this)
    source_retry: float = 300.0
    # accepted for the original's configs; an event loop has no use for them
    worker_method: str | None = None
    ipc_path: str | None = None
    # Prometheus metrics and /healthz over plain HTTP on this address; off while the port is 0
    metrics_addr: str = "127.0.0.1"
    metrics_port: int = 0


@dataclass
class RsyncGroup:
    name: str
    dest: str
    src: str
    line: int
    rsync: str = "rsync"
    rsh: str | None = None
    options: list[str] | None = None
    excludes: list[str] = field(default_factory=list)
    includes: list[str] = field(default_factory=list)
    queue_path: str | None = None
    max_delete: int | None = None
    allow_empty_source: bool = False
    # release mode (deploy.releases); releases = None keeps the in-place sync
    releases: int | None = None
    releases_path: str | None = None
    activate: str = "auto"
    link_dest: bool = True
    # with link_dest: releases are made in two passes once the live one has this many files
    # (deploy.release_sync; below it one --link-dest run into a fresh directory costs as much)
    two_pass_min_files: int = 2000
    after_activate: str | None = None
    check: str | None = None
    check_timeout: float = 30.0
    rollback_on_failed_check: bool = True
    source_retry: float | None = None  # None: [server] source_retry


@dataclass
class AgentConfig:
    path: str | None
    server: ServerSettings
    allow_hosts: list[str]
    allow_paths: list[str]
    groups: dict[str, RsyncGroup]
    jobs_path: str | None
    jobs: dict[str, str]
    # [keys], [policy::*] and server_names (deploy.keyring)
    access: AgentAccess = field(default_factory=AgentAccess)
    # [allow::sources]: when not empty, the only inline sources a request may name
    allow_sources: list[str] = field(default_factory=list)


@dataclass
class ClientSettings:
    port: int = 3440
    # The proxy's deadlines towards its agents, kept together: connect (socket_timeout), one
    # agent's answer (thread_timeout), and the whole order (deadline: below deploy-client's
    # 60 s wait for a proxy, so that it answers, with what it has, before its client gives up).
    thread_timeout: float = 10.0
    socket_timeout: float = 5.0
    deadline: float = 50.0
    key_cipher: str | None = None
    key_id: str | None = None
    bind_host: bool = False
    legacy_auth: bool = False
    ssl: bool = False
    ssl_public_key: str | None = None
    ssl_ca: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None
    max_parallel: int = 64
    ipc_path: str | None = None
    worker_method: str | None = None

    @property
    def uses_tls(self) -> bool:
        """The proxy talks TLS to its agents (a pin or a CA alone turns it on)."""
        return bool(self.ssl or self.ssl_public_key or self.ssl_ca)


@dataclass
class ProxyConfig:
    path: str | None
    server: ServerSettings
    client: ClientSettings
    allow_hosts: list[str]
    api_path: str | None
    keys: dict[str, list[str]]
    servers: dict[str, list[str]]
    policies: dict[str, Policy] = field(default_factory=dict)


def agent_key_cipher(server: ServerSettings) -> str:
    """The key an agent checks requests with: the configured one, else the original's default."""
    return DEFAULT_KEY_CIPHER if server.key_cipher is None else server.key_cipher
