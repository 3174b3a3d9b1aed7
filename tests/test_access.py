"""Tests for deploy.access: host allow lists and the writable-path jail."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.access import AllowedHosts, AllowedPaths, PathNotAllowed, is_within

# --- hosts ----------------------------------------------------------------------------------


def fake_resolver(table: dict[str, list[str]]):
    calls: list[str] = []

    def resolve(name: str) -> list[str]:
        calls.append(name)
        if name not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[name]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


def test_ipv4_exact() -> None:
    """A plain IPv4 entry allows that address and no other."""
    hosts = AllowedHosts(["127.0.0.1", "10.1.2.3"])
    assert hosts.allows("127.0.0.1")
    assert hosts.allows("10.1.2.3")
    assert not hosts.allows("127.0.0.2")
    assert not hosts.allows("10.1.2.30")


def test_ipv4_cidr() -> None:
    """A CIDR entry allows every address of the network, host bits in the entry ignored."""
    hosts = AllowedHosts(["192.168.10.77/24"])
    assert hosts.allows("192.168.10.0")
    assert hosts.allows("192.168.10.255")
    assert not hosts.allows("192.168.11.1")
    assert not hosts.allows("192.168.9.255")


def test_mixed_prefix_lengths() -> None:
    """Several networks of different sizes are all honoured, and nothing between them."""
    hosts = AllowedHosts(["10.0.0.0/8", "172.16.5.0/30", "203.0.113.9"])
    assert hosts.allows("10.255.0.1")
    assert hosts.allows("172.16.5.3")
    assert not hosts.allows("172.16.5.4")
    assert hosts.allows("203.0.113.9")
    assert not hosts.allows("203.0.113.8")
    assert not hosts.allows("11.0.0.1")


def test_everything_network() -> None:
    """0.0.0.0/0 allows every IPv4 address but no native IPv6 one."""
    hosts = AllowedHosts(["0.0.0.0/0"])
    assert hosts.allows("1.2.3.4")
    assert hosts.allows("255.255.255.255")
    assert not hosts.allows("2001:db8::1")


def test_ipv6_exact_and_cidr() -> None:
    """IPv6 addresses and networks work, whatever the spelling of the peer address."""
    hosts = AllowedHosts(["::1", "2001:db8:aa::/48"])
    assert hosts.allows("::1")
    assert hosts.allows("0:0:0:0:0:0:0:1")
    assert hosts.allows("2001:db8:aa:ffff::5")
    assert hosts.allows("2001:DB8:AA::")
    assert not hosts.allows("2001:db8:ab::1")
    assert not hosts.allows("::2")


def test_ipv4_mapped_peer() -> None:
    """An IPv4-mapped IPv6 peer (dual-stack socket) matches the IPv4 entry."""
    hosts = AllowedHosts(["127.0.0.1", "10.0.0.0/8"])
    assert hosts.allows("::ffff:127.0.0.1")
    assert hosts.allows("::ffff:10.20.30.40")
    assert not hosts.allows("::ffff:11.0.0.1")


def test_ipv4_mapped_entry() -> None:
    """An IPv4-mapped entry allows the plain IPv4 peer too."""
    hosts = AllowedHosts(["::ffff:192.0.2.1", "::ffff:198.51.100.0/120"])
    assert hosts.allows("192.0.2.1")
    assert hosts.allows("::ffff:192.0.2.1")
    assert hosts.allows("198.51.100.200")
    assert not hosts.allows("198.51.101.1")


def test_scope_is_stripped() -> None:
    """A link-local peer with a %scope matches the entry without one, and vice versa."""
    hosts = AllowedHosts(["fe80::1", "fe80::2%eth0"])
    assert hosts.allows("fe80::1%eth0")
    assert hosts.allows("fe80::2")
    assert not hosts.allows("fe80::3%eth0")


def test_names_resolved_once_with_injected_resolver() -> None:
    """Host names allow every address they resolve to, resolved once at construction."""
    resolve = fake_resolver({"web1": ["192.0.2.10", "2001:db8::10"], "web2": ["192.0.2.20"]})
    hosts = AllowedHosts(["web1", "web2"], resolve=resolve)
    assert hosts.allows("192.0.2.10")
    assert hosts.allows("2001:db8::10")
    assert hosts.allows("192.0.2.20")
    assert not hosts.allows("192.0.2.30")
    assert resolve.calls == ["web1", "web2"]
    assert hosts.unresolved == []


def test_unresolvable_name_remembered() -> None:
    """An unresolvable name raises nothing, allows nothing and is listed in `unresolved`."""
    resolve = fake_resolver({"web1": ["192.0.2.10"], "empty": []})
    hosts = AllowedHosts(["nosuch.invalid", "web1", "empty"], resolve=resolve)
    assert hosts.unresolved == ["nosuch.invalid", "empty"]
    assert hosts.allows("192.0.2.10")
    assert not hosts.allows("nosuch.invalid")


def test_default_resolver_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default resolver, a getaddrinfo failure lands in `unresolved`."""

    def failing(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", failing)
    hosts = AllowedHosts(["web9.example"])
    assert hosts.unresolved == ["web9.example"]
    assert not hosts.allows("127.0.0.1")


def test_default_resolver_uses_getaddrinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default resolver takes the addresses getaddrinfo returns, scopes stripped."""
    infos = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.5", 0)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::5%eth0", 0, 0, 2)),
    ]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **kw: infos)
    hosts = AllowedHosts(["db1"])
    assert hosts.allows("192.0.2.5")
    assert hosts.allows("fe80::5")
    assert hosts.unresolved == []


def test_empty_list_allows_nothing() -> None:
    """No entries (or only blank ones) allow no address at all."""
    for entries in ([], ["", "  "]):
        hosts = AllowedHosts(entries)
        assert not hosts.allows("127.0.0.1")
        assert not hosts.allows("::1")
        assert not hosts.allows("::ffff:127.0.0.1")


@pytest.mark.parametrize("address", ["", "localhost", "127.0.0.1/32", "[::1]", "1.2.3", "::ffff:"])
def test_garbage_peer_address_denied(address: str) -> None:
    """Anything that is not an IP address is denied, never an exception."""
    hosts = AllowedHosts(["0.0.0.0/0", "::/0"])
    assert not hosts.allows(address)


@given(st.text(max_size=60))
def test_allows_never_raises(address: str) -> None:
    """allows() returns a bool for any text."""
    hosts = AllowedHosts(["10.0.0.0/8", "::1"])
    assert hosts.allows(address) in (True, False)


# --- paths ----------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, str]:
    """allowed/ (with sub/ and a file), outside/ (with secret), and allowedx/ next to allowed/."""
    base = Path(os.path.realpath(tmp_path))
    allowed = base / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "file").write_text("in")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret").write_text("out")
    (base / "allowedx").mkdir()
    return {"base": str(base), "allowed": str(allowed), "outside": str(outside)}


def refused(paths: AllowedPaths, path: str) -> PathNotAllowed:
    with pytest.raises(PathNotAllowed) as info:
        paths.check(path)
    return info.value


def test_inside_ok(tree: dict[str, str]) -> None:
    """An existing directory or file inside the root resolves to itself; so does the root."""
    paths = AllowedPaths([tree["allowed"]])
    allowed = tree["allowed"]
    assert paths.check(allowed) == allowed
    assert paths.check(allowed + "/sub") == allowed + "/sub"
    assert paths.check(allowed + "/file") == allowed + "/file"


def test_nested_nonexistent_ok(tree: dict[str, str]) -> None:
    """A path that does not exist yet, several levels deep, is allowed inside the root."""
    paths = AllowedPaths([tree["allowed"]])
    target = tree["allowed"] + "/sub/new/deeper/leaf"
    assert paths.check(target) == target


def test_trailing_slash_and_dot_normalised(tree: dict[str, str]) -> None:
    """Trailing '/', '/.' and doubled slashes are dropped from the resolved path."""
    paths = AllowedPaths([tree["allowed"]])
    allowed = tree["allowed"]
    assert paths.check(allowed + "/") == allowed
    assert paths.check(allowed + "/.") == allowed
    assert paths.check(allowed + "/sub/") == allowed + "/sub"
    assert paths.check(allowed + "/new/./x/") == allowed + "/new/x"
    assert paths.check(allowed + "//sub//x") == allowed + "/sub/x"


def test_leading_double_slash(tree: dict[str, str]) -> None:
    """'//allowed/x' is fine when it resolves inside; the result has a single leading slash."""
    paths = AllowedPaths([tree["allowed"]])
    assert paths.check("/" + tree["allowed"] + "/x") == tree["allowed"] + "/x"


def test_dotdot_escape_refused(tree: dict[str, str]) -> None:
    """'allowed/../outside' and deeper variants resolve outside and are refused."""
    paths = AllowedPaths([tree["allowed"]])
    allowed = tree["allowed"]
    for path in (
        allowed + "/..",
        allowed + "/../outside",
        allowed + "/../outside/secret",
        allowed + "/../outside/new",
        allowed + "/sub/../../outside",
        allowed + "/../../../../../../etc",
    ):
        assert str(refused(paths, path)) == f"{path} is not allowed!"


def test_dotdot_staying_inside_through_existing_dir(tree: dict[str, str]) -> None:
    """'..' after an existing directory is resolved and allowed when it stays inside."""
    paths = AllowedPaths([tree["allowed"]])
    assert paths.check(tree["allowed"] + "/sub/../file") == tree["allowed"] + "/file"
    assert paths.check(tree["allowed"] + "/sub/../new") == tree["allowed"] + "/new"


def test_dotdot_after_missing_component_refused(tree: dict[str, str]) -> None:
    """'..' after a component that does not exist yet is refused, even if it would stay inside."""
    paths = AllowedPaths([tree["allowed"]])
    refused(paths, tree["allowed"] + "/new/../x")
    refused(paths, tree["allowed"] + "/sub/new/../../file")


def test_symlink_to_outside_dir_refused(tree: dict[str, str]) -> None:
    """A symlink inside the root pointing to an outside directory is refused, and below it."""
    paths = AllowedPaths([tree["allowed"]])
    link = tree["allowed"] + "/escape"
    os.symlink(tree["outside"], link)
    refused(paths, link)
    refused(paths, link + "/secret")
    refused(paths, link + "/new/file")


def test_symlink_to_outside_file_refused(tree: dict[str, str]) -> None:
    """A symlink inside the root pointing to an outside file is refused."""
    paths = AllowedPaths([tree["allowed"]])
    link = tree["allowed"] + "/sub/secret"
    os.symlink(tree["outside"] + "/secret", link)
    refused(paths, link)


def test_relative_symlink_escape_refused(tree: dict[str, str]) -> None:
    """A relative symlink climbing out with '..' is refused."""
    paths = AllowedPaths([tree["allowed"]])
    link = tree["allowed"] + "/sub/up"
    os.symlink("../../outside", link)
    refused(paths, link + "/secret")


def test_dangling_symlink_to_outside_refused(tree: dict[str, str]) -> None:
    """A dangling symlink pointing outside is judged by its target, not as a new plain name."""
    paths = AllowedPaths([tree["allowed"]])
    link = tree["allowed"] + "/dangling"
    os.symlink(tree["outside"] + "/not-yet", link)
    refused(paths, link)
    refused(paths, link + "/child")


def test_symlink_staying_inside_ok(tree: dict[str, str]) -> None:
    """A symlink that points elsewhere inside the root is allowed and resolved to its target."""
    paths = AllowedPaths([tree["allowed"]])
    os.symlink(tree["allowed"] + "/sub", tree["allowed"] + "/current")
    os.symlink("sub/../file", tree["allowed"] + "/file-link")
    assert paths.check(tree["allowed"] + "/current/x") == tree["allowed"] + "/sub/x"
    assert paths.check(tree["allowed"] + "/file-link") == tree["allowed"] + "/file"


def test_symlinked_root(tree: dict[str, str]) -> None:
    """An allowed root given through a symlink is realpath'ed: both spellings are allowed."""
    link = tree["base"] + "/root-link"
    os.symlink(tree["allowed"], link)
    paths = AllowedPaths([link])
    assert paths.roots == (tree["allowed"],)
    assert paths.check(link + "/x") == tree["allowed"] + "/x"
    assert paths.check(tree["allowed"] + "/x") == tree["allowed"] + "/x"


def test_prefix_trick_refused(tree: dict[str, str]) -> None:
    """'allowedx' shares a string prefix with 'allowed' but is not under it."""
    paths = AllowedPaths([tree["allowed"]])
    refused(paths, tree["base"] + "/allowedx")
    refused(paths, tree["base"] + "/allowedx/file")
    refused(paths, tree["base"] + "/allowed-new")


def test_relative_path_refused(tree: dict[str, str]) -> None:
    """Relative and empty paths are refused, even when the cwd is the allowed root."""
    paths = AllowedPaths([tree["allowed"]])
    cwd = os.getcwd()
    os.chdir(tree["allowed"])
    try:
        for path in ("", "sub", "./sub", "file", ".", "~/x"):
            refused(paths, path)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("bad", ["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\ud800"])
def test_control_and_unencodable_characters_refused(tree: dict[str, str], bad: str) -> None:
    """NUL, control characters and names the file system cannot hold are refused."""
    paths = AllowedPaths([tree["allowed"]])
    refused(paths, tree["allowed"] + "/a" + bad + "b")


def test_message_text_exact(tree: dict[str, str]) -> None:
    """The message is '<path as given> is not allowed!', as the original agent answered."""
    paths = AllowedPaths([tree["allowed"]])
    path = tree["allowed"] + "/../outside/"
    error = refused(paths, path)
    assert str(error) == f"{path} is not allowed!"
    assert error.path == path
    assert str(PathNotAllowed("/data/www")) == "/data/www is not allowed!"


def test_several_roots(tree: dict[str, str]) -> None:
    """A path is allowed when it is under any of the roots."""
    paths = AllowedPaths([tree["allowed"] + "/sub", tree["outside"]])
    assert paths.check(tree["outside"] + "/secret") == tree["outside"] + "/secret"
    assert paths.check(tree["allowed"] + "/sub/x") == tree["allowed"] + "/sub/x"
    refused(paths, tree["allowed"] + "/file")


def test_no_roots_allows_nothing(tree: dict[str, str]) -> None:
    """An empty allow list refuses every path."""
    paths = AllowedPaths([])
    refused(paths, tree["allowed"])
    refused(paths, "/")


def test_slash_root_allows_everything_absolute(tree: dict[str, str]) -> None:
    """'/' as a root allows any absolute path (the comparison handles the bare root)."""
    paths = AllowedPaths(["/"])
    assert paths.check(tree["outside"] + "/secret") == tree["outside"] + "/secret"
    assert paths.check("/") == "/"


def test_relative_root_rejected() -> None:
    """A relative allowed root is a configuration error, not silently relative to the cwd."""
    with pytest.raises(ValueError):
        AllowedPaths(["data/www"])


@pytest.mark.parametrize(
    "path, root, expected",
    [
        ("/tmp", "/tmp", True),
        ("/tmp/x", "/tmp", True),
        ("/tmp/x/y", "/tmp/", True),
        ("/tmpx", "/tmp", False),
        ("/tmpx/y", "/tmp", False),
        ("/tm", "/tmp", False),
        ("/", "/tmp", False),
        ("/anything", "/", True),
        ("//tmp/x", "/tmp", True),
        ("/tmp/./x", "/tmp", True),
        ("/tmp/../etc", "/tmp", False),
        ("tmp/x", "/tmp", False),
        ("/tmp/x", "tmp", False),
    ],
)
def test_is_within(path: str, root: str, expected: bool) -> None:
    """is_within compares whole components, never string prefixes, and refuses '..'."""
    assert is_within(path, root) is expected


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300)
@given(
    st.lists(
        st.sampled_from(["sub", "file", "..", ".", "", "new", "x\x00", "outside", "allowedx"]),
        max_size=6,
    )
)
def test_check_result_always_inside(tree: dict[str, str], parts: list[str]) -> None:
    """Whatever the components, check either refuses or returns a path inside the root."""
    paths = AllowedPaths([tree["allowed"]])
    path = tree["allowed"] + "/" + "/".join(parts)
    try:
        result = paths.check(path)
    except PathNotAllowed as error:
        assert str(error) == f"{path} is not allowed!"
    else:
        assert is_within(result, tree["allowed"])
        assert result == os.path.normpath(result)
        assert os.path.realpath(result) == result


@given(st.text(max_size=80))
def test_check_never_raises_other_errors(path: str) -> None:
    """Any text given to check gives a resolved path or PathNotAllowed, nothing else."""
    paths = AllowedPaths(["/"])
    try:
        result = paths.check(path)
    except PathNotAllowed:
        return
    assert result.startswith("/")
