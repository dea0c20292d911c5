"""The README and the documentation show what the code does.

Every ```python block of README.md and docs/*.md runs: the blocks of one file in order, in one
namespace, in a temporary folder that sees the repository's studies/ and examples/. A block that
must not run (a cluster recipe, say) is preceded by the line ``<!-- no-run -->``. Every
``bound-tuner`` command a code block shows is a subcommand of ``bound_tuner.cli.parser.build_parser``
with the options shown, and every ``bound_tuner.x.y`` named in the pages exists.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NO_RUN = "<!-- no-run -->"
MAX_NO_RUN = 5  # keep the blocks that do not run few: examples are written small instead
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first code line
    lang: str
    code: str
    runs: bool

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, indented ones (in lists) dedented."""
    out: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        before = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        out.append(Block(page, i + 2, lang, "\n".join(body) + "\n", before != NO_RUN))
        i = j + 1
    return out


ALL = [b for page in PAGES for b in blocks(page)]
PYTHON_PAGES = sorted({b.page for b in ALL if b.lang in ("python", "py") and b.runs})


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working directory with the repository's studies/ and examples/, nothing else."""
    for name in ("studies", "examples"):
        (tmp_path / name).symlink_to(REPO / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for var in ("BOUND_TUNER_STORAGE", "BOUND_TUNER_ARTIFACTS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_python_examples_run(page, sandbox):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks(page):
        if block.lang not in ("python", "py") or not block.runs:
            continue
        # padded to the block's place in the page, so that tracebacks show the page's lines
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        exec(code, namespace)


def test_few_blocks_are_left_out():
    left_out = [b.where() for b in ALL if not b.runs]
    assert len(left_out) <= MAX_NO_RUN, (
        f"{len(left_out)} code blocks are marked {NO_RUN}: {left_out}; write examples with small "
        "sizes so that they run"
    )
    stray = [b.where() for b in ALL if not b.runs and b.lang not in ("python", "py")]
    assert not stray, f"{NO_RUN} marks only Python blocks (other blocks never run): {stray}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from bound_tuner.cli.parser import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _commands(code: str) -> list[str]:
    """The `bound-tuner ...` invocations of a shell block, continuation lines joined and
    comments removed."""
    code = code.replace("\\\n", " ")
    found = []
    for line in code.splitlines():
        line = re.sub(r"(^|\s)#.*", "", line)
        found += re.findall(r"(?:^|[\s/'\"(])bound-tuner(\s.*)", line)
    return found


def _shown_commands() -> list[tuple[str, str]]:
    """(where, the words after `bound-tuner`) for the commands of the shell blocks and of inline
    code spans such as `bound-tuner report --study NAME`."""
    shown = []
    for block in ALL:
        if block.lang in ("bash", "sh", "shell", "console", ""):
            shown += [(block.where(), rest) for rest in _commands(block.code)]
    for page in PAGES:
        text = re.sub(r"^(`{3,}).*?^\1", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
        for span in re.findall(r"`(bound-tuner [^`]+)`", text):
            shown.append((str(page.relative_to(REPO)), span[len("bound-tuner") :]))
    return shown


def test_shown_commands_exist():
    commands = _subcommands()
    seen, wrong = 0, []
    for where, rest in _shown_commands():
        words = rest.split()
        if not words or not words[0][0].islower():  # `bound-tuner COMMAND --help`
            continue
        seen += 1
        name = words[0]
        if name not in commands:
            wrong.append(f"{where}: bound-tuner {name}: no such command")
            continue
        known = commands[name]._option_string_actions
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            if flag not in known:
                wrong.append(f"{where}: bound-tuner {name} has no option {flag}")
    assert seen >= 10, f"only {seen} bound-tuner commands found in the pages"
    assert not wrong, "\n".join(wrong)


def test_settings_table_is_the_settings():
    """docs/specs.md's table of fixed settings lists bound_tuner.config.settings.SETTINGS, row for row."""
    from bound_tuner.config.settings import SETTINGS

    def row(s) -> str:
        used = ["yes" if model in s.fields else "" for model in ("diffusion", "vae")]
        return f"| `{s.section}.{s.key}` | {used[0]} | {used[1]} | {s.help} |".replace(
            "|  |", "| |"
        )

    text = (REPO / "docs" / "specs.md").read_text(encoding="utf-8")
    shown = re.findall(r"^\| `(?:training|bound)\.\w+` \|.*$", text, re.MULTILINE)
    assert shown == [row(s) for s in SETTINGS], (
        "docs/specs.md's settings table differs from bound_tuner/config/settings.py; its rows should be:\n"
        + "\n".join(row(s) for s in SETTINGS)
    )


def test_spec_keys_are_documented():
    """Every section and key a spec may have is named in docs/specs.md."""
    from bound_tuner.config.schema import SECTIONS

    text = (REPO / "docs" / "specs.md").read_text(encoding="utf-8")
    missing = [f"[{s}]" for s in [*SECTIONS, "search"] if f"`[{s}]`" not in text]
    missing += [
        f"{s}.{key}"
        for s, keys in SECTIONS.items()
        for key in keys
        if not re.search(rf"(?<!\w){re.escape(key)}(?!\w)", text)
    ]
    assert not missing, f"docs/specs.md does not name {missing}"


def test_readme_links_resolve():
    """The README is read on its own (the site's strict build checks docs/): its links to files
    and to its own sections lead somewhere."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    sections = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    }
    wrong = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        if path and not (REPO / path).exists():
            wrong.append(target)
        elif not path and anchor not in sections:
            wrong.append(target)
    assert not wrong, f"README.md links to nothing: {wrong}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if not hasattr(obj, part):
            try:
                obj = importlib.import_module(".".join(parts[: i + 1]))
                continue
            except ImportError:
                return False
        obj = getattr(obj, part)
    return True


def test_named_python_objects_exist():
    """Every bound_tuner.x.y the pages name (in prose or code) is there to import."""
    wrong = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        names = set(re.findall(r"(?<![\w/.])bound_tuner(?:\.[A-Za-z_]\w*)+", text))
        names |= {
            f"bound_tuner.{n.strip()}"
            for imports in re.findall(r"from bound_tuner import ([\w, ]+)", text)
            for n in imports.split(",")
        }
        for name in sorted(names):
            if name == "bound_tuner.db" or name.endswith((".py", ".toml")):
                continue  # a file name
            if not _resolves(name):
                wrong.append(f"{page.relative_to(REPO)}: {name}")
    assert not wrong, "named in the docs but not importable:\n" + "\n".join(wrong)


def test_public_names_resolve():
    import bound_tuner

    for name in bound_tuner.__all__:
        assert getattr(bound_tuner, name) is not None, name
    assert bound_tuner.execution.pool.run_workers  # submodules load on first use
    with pytest.raises(AttributeError):
        bound_tuner.no_such_name  # noqa: B018


def test_import_is_cheap():
    """`import bound_tuner` and a look at its names import neither torch nor Optuna."""
    code = (
        "import sys, bound_tuner\n"
        "names = dir(bound_tuner)\n"
        "print('torch' in sys.modules, 'optuna' in sys.modules, 'DiffusionConfig' in names)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.stdout.split() == ["False", "False", "True"], out.stderr
