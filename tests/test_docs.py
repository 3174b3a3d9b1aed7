"""The docs say what is there (issue 15 item 12): every relative link in README.md and docs/*.md
resolves (file and heading), every project file a doc names exists, every test a doc cites as
proof exists, and no doc calls `socket_timeout` an idle timeout (it is a deadline)."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
NAMED_FILE = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.(?:md|py|ini|service))\b")
CITED_TEST = re.compile(r"`(?:(test_\w+)\.py::)?(test_\w+)`")
# What a doc may name without it being a file of this project.
ELSEWHERE = {
    "procmon.py",  # Twisted's, as a model
    "runprocess.py",
    "sitecustomize.py",
    "client.ini",  # the operator's ~/.config/deploy/client.ini
}


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings."""
    found = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_the_docs_are_found() -> None:
    """The checks below have documents, links, file names and cited tests to check (patterns
    that find nothing prove nothing)."""
    assert [doc_id(d) for d in DOCS] == [
        "README.md",
        "docs/operations.md",
        "docs/robustness.md",
        "docs/tls.md",
    ]
    text = "\n".join(d.read_text() for d in DOCS)
    assert "docs/tls.md" in LINK.findall(text)
    assert "etc/deploy_client.ini" in NAMED_FILE.findall(text)
    assert (
        "test_faults",
        "test_slow_loris_is_closed_at_socket_timeout_while_others_are_served",
    ) in (CITED_TEST.findall(text))


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_relative_link_resolves(doc: Path) -> None:
    """Each `[text](target)` that is not a URL names a file of the project, and its `#anchor`
    a heading there."""
    text = doc.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(target)
    assert not broken, f"{doc_id(doc)}: {broken}"


def project_file(name: str, doc: Path) -> bool:
    if name in ELSEWHERE:
        return True
    candidates = [ROOT / name, doc.parent / name]
    # A bare module or test name: the package's or the tests'.
    candidates += [ROOT / "deploy" / name, ROOT / "tests" / name, ROOT / "bench" / name]
    candidates += [ROOT / "etc" / name, ROOT / "etc" / "systemd" / name]
    return any(c.exists() for c in candidates)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_file_a_doc_names_exists(doc: Path) -> None:
    """A doc names only files that are in the project (docs/robustness.md once cited a
    DESIGN.md that is not)."""
    missing = sorted(
        {name for name in NAMED_FILE.findall(doc.read_text()) if not project_file(name, doc)}
    )
    assert not missing, f"{doc_id(doc)} names files that do not exist: {missing}"


@functools.cache
def defined_tests() -> dict[str, set[str]]:
    """tests/NAME.py → the test functions defined in it."""
    found = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        found[path.stem] = {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
    return found


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_cited_test_exists(doc: Path) -> None:
    """A test named as proof (`test_x.py::test_y`, or a bare `test_y`) is defined: in that file,
    or for a bare name in some test file."""
    defined = defined_tests()
    everywhere = set().union(*defined.values())
    missing = []
    for module, name in CITED_TEST.findall(doc.read_text()):
        if module and name not in defined.get(module, set()):
            missing.append(f"{module}.py::{name}")
        elif not module and name not in everywhere:
            missing.append(name)
    assert not missing, f"{doc_id(doc)} cites tests that do not exist: {missing}"


def test_socket_timeout_is_called_a_deadline_everywhere() -> None:
    """`socket_timeout` is a deadline from connect for the whole request: no doc or sample calls
    it an idle timeout (docs/operations.md once did)."""
    texts = {doc_id(d): d.read_text() for d in DOCS}
    texts.update({doc_id(p): p.read_text() for p in (ROOT / "etc").glob("*.ini")})
    wrong = [
        f"{name}: {line.strip()}"
        for name, text in texts.items()
        for line in text.splitlines()
        if re.search(r"socket.timeout", line) and re.search(r"idle (timeout|seconds)", line)
    ]
    assert not wrong, wrong
    assert "a deadline" in texts["docs/operations.md"]
