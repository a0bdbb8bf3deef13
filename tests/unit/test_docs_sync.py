"""The docs agree with the code: each command page carries the flag table generated from the
parser, the pages link to files that exist, and the MindSpeed mapping names real flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tunelab.docs_gen import BEGIN, END, flags_block, render_page, sync, verb_parsers

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
MY_PAGES = [
    ROOT / "README.md",
    DOCS / "index.md",
    DOCS / "mindspeed-migration.md",
    DOCS / "demo.md",
]


def test_every_command_page_has_the_parsers_flags():
    stale = sync(DOCS, check=True)
    assert not stale, f"out of date, run `python -m tunelab.docs_gen`: {stale}"


def test_generated_block_lists_every_option_and_detects_a_new_one():
    parsers = verb_parsers()
    for verb, parser in parsers.items():
        block = flags_block(verb, parser)
        for action in parser._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert f"`{opt}" in block, (verb, opt)
    # a flag added to the parser makes the committed page stale
    parser = parsers["generate"]
    page = (DOCS / "generate.md").read_text(encoding="utf-8")
    parser.add_argument("--brand-new-flag", help="added by the test")
    assert render_page(page, flags_block("generate", parser)) != page


def test_render_page_replaces_only_the_block():
    text = f"# title\n\nintro\n\n{BEGIN}\nold\n{END}\n\n## after\n"
    out = render_page(text, f"{BEGIN}\nnew\n{END}")
    assert out == f"# title\n\nintro\n\n{BEGIN}\nnew\n{END}\n\n## after\n"
    assert render_page("# t\n", f"{BEGIN}\nx\n{END}") == f"# t\n\n{BEGIN}\nx\n{END}\n"


def _links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return [m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in m]


@pytest.mark.parametrize("page", MY_PAGES, ids=lambda p: p.name)
def test_links_and_config_paths_resolve(page):
    for link in _links(page):
        assert (page.parent / link).exists(), f"{page.name}: broken link {link}"
    if page.name == "demo.md":  # its configs/ paths are inside the demo directory
        return
    for cfg in re.findall(r"configs/[\w./-]+\.yaml", page.read_text(encoding="utf-8")):
        if "*" not in cfg:
            assert (ROOT / cfg).is_file(), f"{page.name}: {cfg} does not exist"


def test_index_links_every_page():
    linked = {Path(x).name for x in _links(DOCS / "index.md")}
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "index.md" and p.name not in linked]
    assert not missing, f"docs/index.md does not link {missing}"


def _tunelab_commands(page: Path) -> list[list[str]]:
    """Every `tunelab VERB ...` in inline code or code blocks, as argv after `tunelab`."""
    text = page.read_text(encoding="utf-8").replace("\\\n", " ")
    found = []
    for span in re.findall(r"`(tunelab [^`]+)`", text) + re.findall(
        r"^(?:torchrun .*?-m )?(tunelab \S.*)$", text, flags=re.M
    ):
        try:
            argv = shlex.split(span)[1:]
        except ValueError:
            continue
        found.append(argv)
    return found


@pytest.mark.parametrize("page", MY_PAGES, ids=lambda p: p.name)
def test_flags_named_in_my_pages_exist(page):
    from tunelab.config import load_config

    parsers = verb_parsers()
    checked = 0
    for argv in _tunelab_commands(page):
        if not argv or argv[0] not in parsers:
            continue
        verb, rest = argv[0], argv[1:]
        flags = [a.split("=")[0] for a in rest if a.startswith("--")]
        if verb == "train":  # config overrides: --section.key=value and Megatron names
            overrides = [a for a in rest if a.startswith("--") and "=" in a]
            load_config(None, overrides)
            checked += len(overrides)
            continue
        known = {o for a in parsers[verb]._actions for o in a.option_strings}
        for f in flags:
            assert f in known, f"{page.name}: `tunelab {verb}` has no flag {f}"
            checked += 1
    if page.name in ("README.md", "mindspeed-migration.md"):
        assert checked > 10


def test_config_reference_lists_every_key_and_alias():
    import dataclasses

    from tunelab.config import ALIASES, SECTIONS

    text = (DOCS / "config.md").read_text(encoding="utf-8")
    for section, cls in SECTIONS.items():
        start = text.index(f"### `{section}`")
        end = text.find("\n### ", start + 1)
        part = text[start : end if end != -1 else None]
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in part, f"docs/config.md: {section}.{f.name} is not listed"
    for alias in ALIASES:
        assert f"`{alias}`" in text, f"docs/config.md: alias {alias} is not listed"
