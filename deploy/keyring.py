"""Where keys come from and how a presented one is found: an agent's `[keys]` (named HMAC secrets,
inline or in a private file), its policies and `server_names`; and a proxy's API keys, plain or
stored as `sha256:<hex>` (compared in constant time), with the policies that scope them."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from deploy.auth import KEY_ID
from deploy.ini import BLANKS, ConfigError, IniEntry, IniSection
from deploy.policy import ALLOWED_UNSCOPED, Decision, Policies, Policy, split_policies

FILE_PREFIX = "file:"
HASH_PREFIX = "sha256:"
_HASHED = re.compile(r"sha256:[0-9a-f]{64}")
MAX_KEY_FILE_BYTES = 4096


@dataclass
class AgentAccess:
    """What an agent config says about callers beyond `key_cipher`: named keys, their policies,
    and the names a signature must be bound to (empty: unbound signatures are accepted)."""

    keys: dict[str, str] = field(default_factory=dict)
    policies: dict[str, Policy] = field(default_factory=dict)
    server_names: list[str] = field(default_factory=list)


def _key_file(reference: str, path: str, line: int) -> str:
    """The secret held by a `file:PATH` key (relative to the config's directory)."""
    base = os.path.dirname(os.path.abspath(path))
    name = os.path.join(base, os.path.expanduser(reference[len(FILE_PREFIX) :]))
    try:
        with open(name, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read key file {name}: {e.strerror or e}", path, line) from None
    if not stat.S_ISREG(mode) or mode & 0o077:
        raise ConfigError(
            f"key file {name} must be a regular file only its owner can read "
            f"(mode {stat.S_IMODE(mode):04o}; chmod 600 {name})",
            path,
            line,
        )
    secret = data.decode("utf-8", "surrogateescape").strip(BLANKS + "\n")
    if not secret or len(data) > MAX_KEY_FILE_BYTES or "\n" in secret:
        raise ConfigError(f"key file {name} must hold one line, the secret", path, line)
    return secret


def _agent_keys(section: IniSection, path: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for key_id, entry in section.entries.items():
        if not KEY_ID.fullmatch(key_id):
            raise ConfigError(
                f"[keys] {key_id!r}: a key id is 1 to 64 letters, digits, '.', '_' or '-'",
                path,
                entry.line,
            )
        if isinstance(entry.value, list) or not entry.value:
            raise ConfigError(f"[keys] {key_id}: write '{key_id} = SECRET'", path, entry.line)
        value = entry.value
        keys[key_id] = (
            _key_file(value, path, entry.line) if value.startswith(FILE_PREFIX) else value
        )
    return keys


def _names(entry: IniEntry, path: str) -> list[str]:
    names = []
    for value, line in entry.pairs():
        for name in value.split(","):
            name = name.strip(BLANKS)
            if not name:
                raise ConfigError("server_names[]: empty value", path, line)
            names.append(name)
    return names


def split_agent_access(
    sections: Mapping[str, IniSection], path: str
) -> tuple[dict[str, IniSection], AgentAccess]:
    """Take `[keys]`, `[policy::*]` and `[server] server_names[]` out of an agent config's
    sections; the rest is left for `deploy.config`."""
    rest, policies = split_policies(sections, path)
    access = AgentAccess(policies=policies)
    for name, section in list(rest.items()):
        if name == "keys":
            access.keys = _agent_keys(section, path)
            del rest[name]
        elif name == "server" and "server_names" in section.entries:
            entries = dict(section.entries)
            access.server_names = _names(entries.pop("server_names"), path)
            rest[name] = IniSection(section.name, section.line, entries)
    for key_id in policies:
        if key_id not in access.keys:
            raise ConfigError(
                f"[policy::{key_id}]: no key {key_id} in [keys]",
                path,
                sections[f"policy::{key_id}"].line,
            )
    return rest, access


# --------------------------------------------------------------------------- the proxy


def api_key_hash(api_key: str) -> str:
    """How an API key is stored at rest: `sha256:` and the hex of its sha256
    (`printf %s KEY | sha256sum`)."""
    return HASH_PREFIX + hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


def check_api_keys(
    keys: Mapping[str, list[str]], policies: Mapping[str, Policy], path: str
) -> None:
    """ConfigError for a malformed hashed key or a policy that scopes no `[keys]` entry."""
    for entry in keys:
        if entry.lower().startswith(HASH_PREFIX) and not _HASHED.fullmatch(entry):
            raise ConfigError(f"[keys] {entry[:20]}...: expected sha256: and 64 hex digits", path)
    for policy in policies.values():
        if policy.key not in keys:
            raise ConfigError(f"[policy::{policy.key_id}]: key is not an entry of [keys]", path)


@dataclass(frozen=True)
class ApiKey:
    """A `[keys]` entry a presented key matched: the groups it grants, its policy if any."""

    groups: tuple[str, ...]
    policy: Policy | None = None

    @property
    def key_id(self) -> str | None:
        return self.policy.key_id if self.policy is not None else None

    def granted_groups(self) -> list[str]:
        """The `[keys]` groups, narrowed to the policy's `groups[]` when there is one."""
        if self.policy is None:
            return list(self.groups)
        return [g for g in self.groups if self.policy.admits_group(g)]


class ApiKeys:
    """The proxy's API keys: a plain entry is looked up as written, a `sha256:` one by the hash
    of the presented key, every hashed entry compared in constant time."""

    def __init__(
        self, keys: Mapping[str, list[str]], policies: Mapping[str, Policy] | None = None
    ) -> None:
        scoped = {p.key: p for p in (policies or {}).values()}
        self._plain: dict[str, ApiKey] = {}
        self._hashed: list[tuple[str, ApiKey]] = []
        for entry, groups in keys.items():
            key = ApiKey(tuple(groups), scoped.get(entry))
            if _HASHED.fullmatch(entry):
                self._hashed.append((entry, key))
            else:
                self._plain[entry] = key
        self.policies = Policies({p.key_id: p for p in scoped.values()})

    def find(self, presented: str) -> ApiKey | None:
        """The entry `presented` matches, or None."""
        if not presented:
            return None
        found = self._plain.get(presented)
        digest = api_key_hash(presented)
        for entry, key in self._hashed:
            # No early exit: the time taken does not say which entry (if any) matched.
            if hmac.compare_digest(entry, digest):
                found = found or key
        return found

    def decide(self, presented: str, order: str, options: str) -> tuple[str | None, Decision]:
        """(key id, decision) for a proxy order by the key `presented`: its policy's orders and
        exec jobs (its groups narrow the grant, `ApiKey.granted_groups`). A key that is unknown
        or has no policy is decided by the `[keys]` grant alone."""
        found = self.find(presented)
        if found is None or found.policy is None:
            return None, ALLOWED_UNSCOPED
        job = options.partition(",")[0].strip(BLANKS) if order == "exec" else None
        return found.key_id, found.policy.decide(order, None, job)
