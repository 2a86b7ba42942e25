"""The documentation stays true to the tree: option comments, relative links, no citation of absent pages.

Plain file reading only (no torch, no Hydra), so these run in well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# `  - group: option   # a | b | c (free text)`: a defaults-list entry and its option comment.
_ENTRY = re.compile(r"^\s*-\s+(?P<group>[\w/@]+)\s*:\s*(?P<option>\S+)\s*(?:#\s*(?P<comment>.*))?$")
# A markdown link or image target: [text](target) / ![alt](target).
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)\s*\)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_PARTIAL = "..."  # a list ending in this names only some options, on purpose


def defaults_entries() -> list[tuple[str, str, str | None]]:
    """(group, default option, option comment or None) of every group in conf/train.yaml's defaults."""
    entries, inside = [], False
    for line in (CONF / "train.yaml").read_text().splitlines():
        if line.startswith("defaults:"):
            inside = True
            continue
        if inside and line and not line.startswith((" ", "#")):
            break
        match = _ENTRY.match(line) if inside else None
        if match and not match["group"].startswith("override"):
            entries.append((match["group"], match["option"], match["comment"]))
    return entries


def listed_options(comment: str) -> list[str]:
    """The `a | b | c` names before any parenthesised free text."""
    return [name.strip() for name in comment.split("(")[0].split("|") if name.strip()]


def option_files(group: str) -> set[str]:
    return {path.stem for path in (CONF / group).glob("*.yaml")}


ENTRIES = defaults_entries()


def test_train_yaml_defaults_are_parsed():
    # A guard on the parser itself: every config group of train.yaml's defaults list is seen.
    assert [group for group, _, _ in ENTRIES] == [
        "sampler", "reward", "algorithm", "model", "hardware", "prompts", "logger", "eval", "experiment",
    ]


@pytest.mark.parametrize(("group", "default", "comment"), ENTRIES, ids=[e[0] for e in ENTRIES])
def test_option_comment_names_real_options(group, default, comment):
    names = listed_options(comment or "")
    assert names and all(re.fullmatch(r"\w+|\.\.\.", name) for name in names), (
        f"conf/train.yaml: '{group}: {default}' needs an option comment '# a | b | c', got {comment!r}"
    )
    partial = names[-1] == _PARTIAL
    names = names[:-1] if partial else names
    files = option_files(group)
    unknown = [name for name in names if name not in files]
    assert not unknown, f"conf/train.yaml lists {group} options with no conf/{group}/<name>.yaml: {unknown}"
    assert len(set(names)) == len(names), f"conf/train.yaml lists a {group} option twice: {names}"
    if default != "null":
        assert default in names, f"conf/train.yaml: the default {group}={default} is not in its own list {names}"
    if not partial:
        missing = sorted(files - set(names))
        assert not missing, (
            f"conf/train.yaml's {group} comment omits {missing}: list them, or end the list with "
            f"'| {_PARTIAL}' and say where the rest are"
        )


def markdown_files() -> list[Path]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return pages + sorted((ROOT / "benchmarks" / "results").rglob("*.md"))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def relative_links(page: Path) -> list[str]:
    text = _FENCE.sub("", page.read_text())  # a link shown inside a code block is not a link
    return [target for target in _LINK.findall(text) if not re.match(r"^[a-z][a-z+.-]*:", target)]


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_no_source_cites_a_page_outside_the_repository():
    # The design notes the code was first written against are not in the repository; docs/design.md
    # is. This file names the old page to look for it, so it is the one file left out.
    cited = []
    for folder in ("src", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path == Path(__file__).resolve() or path.suffix not in {".py", ".md", ".txt", ".yaml", ".sh"}:
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if re.search(r"\bDESIGN\b", line):
                    cited.append(f"{path.relative_to(ROOT)}:{number}")
    assert not cited, f"cite docs/design.md (its section name) instead of DESIGN: {cited}"
