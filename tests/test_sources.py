"""Tests of deploy.sources (inline sources parsed as rsync reads them, the checks on their host
and user parts, the [allow::sources] rules, the remote-shell switch) and of how TargetResolver
answers with them. The real agent and proxy are in tests/test_request_bounds.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.access import AllowedPaths, PathNotAllowed
from deploy.errors import InvalidTarget, status_for
from deploy.sources import (
    DAEMON,
    REMOTE_SHELL,
    AllowedSources,
    RemoteSource,
    SourceNotAllowed,
    SourceRule,
)
from deploy.targets import TargetResolver, names_a_remote_host


@pytest.mark.parametrize(
    ("source", "parsed"),
    [
        ("h::M/x/y", RemoteSource(DAEMON, "h", None, "M", "x/y")),
        ("u@h.example.com::M", RemoteSource(DAEMON, "h.example.com", "u", "M", "")),
        ("rsync://h/M/x", RemoteSource(DAEMON, "h", None, "M", "x")),
        ("rsync://u@h:8730/M/", RemoteSource(DAEMON, "h", "u", "M", "")),
        ("rsync://[::1]:873/M/x", RemoteSource(DAEMON, "::1", None, "M", "x")),
        ("[::1]::M/x", RemoteSource(DAEMON, "::1", None, "M", "x")),
        ("h:/etc/", RemoteSource(REMOTE_SHELL, "h", None, None, "/etc/")),
        ("deploy@10.0.0.5:rel", RemoteSource(REMOTE_SHELL, "10.0.0.5", "deploy", None, "rel")),
        ("h:/x@y", RemoteSource(REMOTE_SHELL, "h", None, None, "/x@y")),
    ],
)
def test_sources_parse_as_rsync_reads_them(source: str, parsed: RemoteSource) -> None:
    """Daemon (`::`, rsync://) and remote-shell (`:`) sources, with user, port, IPv6."""
    assert RemoteSource.parse(source) == parsed
    assert names_a_remote_host(source)


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("x@-oProxyCommand=evil:/srv", "bad host '-oProxyCommand=evil'"),
        ("-oProxyCommand=evil:/srv", "bad host"),
        ("x@-oProxyCommand=/tmp/evil:/srv", "name a host"),  # a `/` before the `:`: local
        ("-l:/x", "bad host"),
        ("-x@h:/x", "bad user '-x'"),
        ("@h:/x", "bad user ''"),
        ("a b:/x", "bad host 'a b'"),
        ("h%eth0:/x", "bad host"),
        ("[nothex]::M", "bad IPv6 address"),
        ("rsync://h:80x/M", "bad port"),
        ("rsync://-h/M", "bad host"),
        ("a@b@h:/x", "name a host"),
        ("/etc/", "name a host"),
        ("./a:b", "name a host"),
        (":/etc/", "name a host"),
        ("::M", "name a host"),
    ],
)
def test_bad_host_and_user_parts_are_refused(source: str, why: str) -> None:
    """The host (also after `user@`) and the user must be plain names: never an option for ssh
    (`-oProxyCommand=...`), never empty; a source without a host is local."""
    with pytest.raises(ValueError, match=why.replace("[", r"\[")):
        RemoteSource.parse(source)
    assert not names_a_remote_host(source)


def test_remote_shell_sources_are_refused_by_default() -> None:
    """`HOST:path` (rsync would run ssh as the agent's user) is refused unless allowed, with
    the key to set in the message; daemon sources are not concerned."""
    sources = AllowedSources(())
    with pytest.raises(SourceNotAllowed) as info:
        sources.check("localhost:/etc/")
    assert status_for(info.value) == 403
    assert str(info.value).startswith("localhost:/etc/ is not allowed! (")
    assert "allow_inline_remote_shell = true" in str(info.value)
    with pytest.raises(SourceNotAllowed):
        sources.check("root@localhost:/etc/")
    assert sources.check("h::M/").kind == DAEMON
    assert AllowedSources((), allow_remote_shell=True).check("localhost:/etc/").host == "localhost"


RULES = ["rsync.example.com", "10.0.0.0/8", "fd00::/8", "release.example.com::www/current"]


@pytest.mark.parametrize(
    ("source", "allowed"),
    [
        ("rsync.example.com::anything/x", True),
        ("RSYNC.Example.COM::m", True),
        ("deploy@rsync.example.com::m", True),
        ("rsync://rsync.example.com:8730/m/", True),
        ("rsync.example.com.evil.net::m", False),
        ("evil.net::m", False),
        ("10.1.2.3::m", True),
        ("rsync://10.255.0.1/m", True),
        ("11.0.0.1::m", False),
        ("127.1::m", False),  # a resolver reads 127.0.0.1: only address literals match a network
        ("[fd00::5]::m", True),
        ("[fe80::1]::m", False),
        ("release.example.com::www/current", True),
        ("release.example.com::www/current/", True),
        ("release.example.com::www/current/app/x", True),
        ("rsync://release.example.com/www/current/app", True),
        ("release.example.com::www/currentevil", False),
        ("release.example.com::www/current/../../etc", False),
        ("release.example.com::www", False),
        ("release.example.com::wwwx/current", False),
        ("release.example.com::other/current", False),
    ],
)
def test_allow_sources_rules(source: str, allowed: bool) -> None:
    """Names match the host as written (any case, `user@` aside), networks match address
    literals inside them, HOST::MODULE/path matches that module at or below that path."""
    sources = AllowedSources(RULES)
    if allowed:
        assert sources.check(source)
    else:
        with pytest.raises(SourceNotAllowed, match=r"is not in \[allow::sources\]"):
            sources.check(source)


def test_rules_still_need_the_remote_shell_switch() -> None:
    """A host named in [allow::sources] does not open `HOST:path` by itself."""
    with pytest.raises(SourceNotAllowed, match="allow_inline_remote_shell"):
        AllowedSources(RULES).check("rsync.example.com:/srv/")
    both = AllowedSources(RULES, allow_remote_shell=True)
    assert both.check("rsync.example.com:/srv/").kind == REMOTE_SHELL
    with pytest.raises(SourceNotAllowed, match="allow::sources"):
        both.check("evil.net:/srv/")
    with pytest.raises(SourceNotAllowed, match="allow::sources"):
        AllowedSources(["h::www"], allow_remote_shell=True).check("h:/www/")


@pytest.mark.parametrize(
    "entry", ["u@h", "h:/x", "h::", "rsync://h/M", "-h", "h::M/../x", "a b", "", "10.0.0.0/33"]
)
def test_bad_rules_are_refused(entry: str) -> None:
    """An entry that is not a host name, address, network or HOST::MODULE[/path] is an error."""
    with pytest.raises(ValueError):
        SourceRule.parse(entry)


def resolver(tmp_path: Path, sources: AllowedSources) -> TargetResolver:
    return TargetResolver({}, AllowedPaths([str(tmp_path)]), sources)


def test_resolver_answers_403_for_a_source_not_allowed_and_400_for_a_bad_one(
    tmp_path: Path,
) -> None:
    """Through TargetResolver: a source the config does not allow is 403 (a PathNotAllowed), a
    malformed one 400 naming it, an allowed one resolves."""
    targets = resolver(tmp_path, AllowedSources(["h"]))
    with pytest.raises(PathNotAllowed) as denied:
        targets.resolve(f"other::M/,{tmp_path}/web")
    assert status_for(denied.value) == 403
    with pytest.raises(PathNotAllowed, match="allow_inline_remote_shell"):
        targets.resolve(f"h:/etc/,{tmp_path}/web")
    with pytest.raises(InvalidTarget) as bad:
        targets.resolve(f"u@-oProxyCommand=x:/etc/,{tmp_path}/web")
    assert (
        str(bad.value)
        == "bad remote source 'u@-oProxyCommand=x:/etc/': bad host '-oProxyCommand=x'"
    )
    target, group = targets.resolve(f"h::M/,{tmp_path}/web")
    assert (target.dest, group) == ("h::M/", None)


def test_resolver_default_refuses_remote_shell_sources(tmp_path: Path) -> None:
    """A TargetResolver built without a sources policy refuses `HOST:path` too."""
    targets = TargetResolver({}, AllowedPaths([str(tmp_path)]))
    with pytest.raises(SourceNotAllowed):
        targets.resolve(f"localhost:/etc/,{tmp_path}/x")


def test_an_inline_target_may_not_write_into_a_release_groups_tree(tmp_path: Path) -> None:
    """A release-mode group's live path (through its symlink too) and its releases are the
    group's alone: an inline sync there (in place, into a live release) is a 400 naming the
    group; a neighbour directory and an in-place group's path are not refused."""
    from deploy.config import RsyncGroup

    releases = tmp_path / "web.releases"
    (releases / "20260101T000000Z-ab12").mkdir(parents=True)
    (tmp_path / "web").symlink_to(releases / "20260101T000000Z-ab12")
    (tmp_path / "other").mkdir()
    groups = {
        "web": RsyncGroup("web", "h::M/", str(tmp_path / "web"), 1, releases=3),
        "plain": RsyncGroup("plain", "h::M/", str(tmp_path / "other"), 2),
    }
    resolver = TargetResolver(groups, AllowedPaths([str(tmp_path)]))
    for local in ("web", "web/", "./web", "web.releases/20260101T000000Z-ab12", "web.releases"):
        with pytest.raises(InvalidTarget) as e:
            resolver.resolve(f"rsync.example.com::M/,{tmp_path}/{local}")
        assert "release-mode group 'web'" in str(e.value) and status_for(e.value) == 400
    target, group = resolver.resolve(f"rsync.example.com::M/,{tmp_path}/other")
    assert group is None and target.src == f"{tmp_path}/other"
