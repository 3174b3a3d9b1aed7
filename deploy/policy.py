"""Who may do what: the `[policy::KEY_ID]` sections of an agent config or a proxy API file as
plain `Policy` objects, and `Policies.decide`, which says whether a key may give an order on a
group or an exec job. No reactor and no I/O: the daemons enforce what it decides.

Semantics: a key without a policy may do everything (as every key could before policies). Once a
key has a policy, everything it does not list is refused (default deny): the order must be in
`orders[]`, the group an order names in `groups[]`, the job an `exec` runs in `jobs[]`. Every
dimension a request touches must match; there is no order between entries, so no "first match"
to get wrong. Groups and jobs are exact names or shell-style globs (`service:nginx*`); `*` alone
admits every group (an inline `SOURCE,/path` target is not a group: only `*` admits it) or job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

from deploy.auth import KEY_ID
from deploy.ini import BLANKS, ConfigError, IniSection

PREFIX = "policy::"
# The orders whose options name a target: a group, or an inline SOURCE,/path.
TARGET_ORDERS = ("status", "rlist", "rsync", "rkill")
_ORDER = re.compile(r"\*|[a-z][a-z0-9_-]{0,31}")
# Globs, not regular expressions: no `[` classes, so a pattern says plainly what it admits.
_PATTERN = re.compile(r"[^\[\]\x00-\x1f\x7f]{1,256}")
INLINE = "inline target"


@dataclass(frozen=True)
class Decision:
    """What a policy says of one request; `reason` names what was refused, for the 403."""

    allowed: bool
    reason: str

    @property
    def verdict(self) -> str:
        """What the audit log records: `allow` or `deny`."""
        return "allow" if self.allowed else "deny"


ALLOWED_UNSCOPED = Decision(True, "no policy")


@dataclass(frozen=True)
class Policy:
    """One key's allow lists; `key` is, on the proxy, the `[keys]` entry the policy scopes."""

    key_id: str
    orders: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    jobs: tuple[str, ...] = ()
    key: str | None = None

    def decide(self, order: str, group: str | None = None, job: str | None = None) -> Decision:
        """`group` None: the request names no group; "" is an inline target."""
        if not any(allowed in ("*", order) for allowed in self.orders):
            return Decision(False, f"order {order} is not allowed for key {self.key_id}")
        if group is not None and not self.admits_group(group):
            what = INLINE if group == "" else f"group {group}"
            return Decision(False, f"{what} is not allowed for key {self.key_id}")
        if job is not None and not any(fnmatchcase(job, pattern) for pattern in self.jobs):
            return Decision(False, f"job {job} is not allowed for key {self.key_id}")
        return Decision(True, f"allowed by policy {self.key_id}")

    def admits_group(self, group: str) -> bool:
        return any(fnmatchcase(group, pattern) for pattern in self.groups)


def request_scope(order: str, options: str) -> tuple[str | None, str | None]:
    """(group, job) an agent order's `options` names: `exec` runs the job before the first
    comma; a target order names a group, or an inline target (""); other orders name their
    group first."""
    first = options.partition(",")[0].strip(BLANKS)
    if order == "exec":
        return None, first
    if order in TARGET_ORDERS:
        return ("" if "," in options else options.strip(BLANKS)), None
    return first, None


class Policies:
    """Every key's policy, by key id."""

    def __init__(self, policies: Mapping[str, Policy] | None = None) -> None:
        self.policies = dict(policies or {})

    def __bool__(self) -> bool:
        return bool(self.policies)

    def get(self, key_id: str | None) -> Policy | None:
        return self.policies.get(key_id) if key_id is not None else None

    def decide(
        self, key_id: str | None, order: str, group: str | None = None, job: str | None = None
    ) -> Decision:
        """Whether the key `key_id` (None: the unnamed key) may give `order` on `group`/`job`."""
        policy = self.get(key_id)
        if policy is None:
            return ALLOWED_UNSCOPED
        return policy.decide(order, group, job)

    def decide_options(self, key_id: str | None, order: str, options: str) -> Decision:
        """`decide` for an agent order, the group or job read from its `options`."""
        group, job = request_scope(order, options)
        return self.decide(key_id, order, group, job)


def _items(section: IniSection, key: str, path: str, check: re.Pattern[str]) -> tuple[str, ...]:
    entry = section.entries.get(key)
    if entry is None:
        return ()
    items: list[str] = []
    for value, line in entry.pairs():
        for item in value.split(","):
            item = item.strip(BLANKS)
            if not check.fullmatch(item):
                raise ConfigError(f"[{section.name}] {key}[]: bad value {item!r}", path, line)
            items.append(item)
    return tuple(items)


def parse_policy(section: IniSection, path: str, *, with_key: bool = False) -> Policy:
    """One `[policy::KEY_ID]` section: `orders[]`, `groups[]`, `jobs[]` (and on the proxy `key`,
    the `[keys]` entry it scopes, as written there)."""
    key_id = section.name[len(PREFIX) :].strip(BLANKS)
    if not KEY_ID.fullmatch(key_id):
        raise ConfigError(
            f"[{section.name}]: a key id is 1 to 64 letters, digits, '.', '_' or '-'",
            path,
            section.line,
        )
    known = ("orders", "groups", "jobs", "key") if with_key else ("orders", "groups", "jobs")
    for name, entry in section.entries.items():
        if name not in known:
            raise ConfigError(f"unknown key {name!r} in [{section.name}]", path, entry.line)
    key: str | None = None
    if with_key:
        written = section.entries.get("key")
        if written is None or isinstance(written.value, list) or not written.value:
            raise ConfigError(
                f"[{section.name}] needs key = the [keys] entry it scopes", path, section.line
            )
        key = written.value
    return Policy(
        key_id=key_id,
        orders=_items(section, "orders", path, _ORDER),
        groups=_items(section, "groups", path, _PATTERN),
        jobs=_items(section, "jobs", path, _PATTERN),
        key=key,
    )


def split_policies(
    sections: Mapping[str, IniSection], path: str, *, with_key: bool = False
) -> tuple[dict[str, IniSection], dict[str, Policy]]:
    """The `[policy::*]` sections of a file parsed, and the other sections left for the caller."""
    rest: dict[str, IniSection] = {}
    policies: dict[str, Policy] = {}
    for name, section in sections.items():
        if name.startswith(PREFIX):
            policy = parse_policy(section, path, with_key=with_key)
            policies[policy.key_id] = policy
        else:
            rest[name] = section
    return rest, policies


def unknown_orders(policies: Iterable[Policy], known: Iterable[str]) -> list[str]:
    """`key_id: order` for each listed order this daemon does not take (for a warning)."""
    names = set(known) | {"*"}
    return [f"{p.key_id}: {o}" for p in policies for o in p.orders if o not in names]
