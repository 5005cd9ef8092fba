"""The README and the pages under docs/ cannot rot: every code block in them is checked.

- A Python block runs, in a fresh process from a temporary folder (`../shared/` in it points at the
  shared data beside the clone; the block skips where that is absent).
- A block preceded by `<!-- check: continues -->` runs after the page's block before it, in the same
  process; `<!-- check: not run (why) -->` marks a block that needs what a test machine lacks (several
  processes, a GPU): it is compiled and its imports run.
- A text block preceded by `<!-- check: output -->` is what the Python block before it prints: the
  same lines, numbers aside.
- A shell block's commands are parsed: `sparsegrad ...` (also after `-m sparsegrad`) by the command's
  own parser, `make T` against the Makefile's targets, `pip install ".[x]"` against the extras.
- A table that starts like the command's summary table has its columns.
- Every relative link points at a file that exists.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "results.md")]
MARK = re.compile(r"<!--\s*check:\s*(.*?)\s*-->")


@dataclass
class Block:
    page: Path
    line: int          # where the fence opens (1-based)
    lang: str
    code: str
    mark: str          # the `<!-- check: ... -->` right above the fence, or ""

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines, found, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        start, lang, body = i, fence.group(2), []
        i += 1
        while not lines[i].lstrip().startswith("```"):
            body.append(lines[i][len(fence.group(1)):])
            i += 1
        above = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.search(above)
        found.append(Block(page, start + 1, lang, "\n".join(body) + "\n", mark.group(1) if mark else ""))
        i += 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]


def _scripts() -> list[tuple[list[Block], Block | None]]:
    """The Python blocks to run: each with the blocks that continue it, and the expected output after them."""
    scripts = []
    for page in PAGES:
        page_blocks = blocks(page)
        for i, b in enumerate(page_blocks):
            if b.lang != "python" or b.mark.startswith("not run") or b.mark == "continues":
                continue
            chain, j = [b], i + 1
            while j < len(page_blocks) and page_blocks[j].mark in ("continues", "output"):
                if page_blocks[j].lang == "python":
                    chain.append(page_blocks[j])
                j += 1
            output = next((x for x in page_blocks[i + 1:j] if x.mark == "output"), None)
            scripts.append((chain, output))
    return scripts


def _numbers_aside(text: str) -> list[str]:
    return [re.sub(r"\d[\d,.]*", "#", line).rstrip() for line in text.strip().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("chain,output", _scripts(), ids=lambda x: str(x[0]) if isinstance(x, list) else "")
def test_python_block_runs(chain, output, tmp_path):
    code = "\n".join(b.code for b in chain)
    if "../shared/" in code:
        if not SHARED.is_dir():
            pytest.skip(f"{chain[0]} reads ../shared/, absent beside this clone")
        code = code.replace("../shared/", f"{SHARED}/")
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1200, check=False)
    assert done.returncode == 0, f"{chain[0]} failed:\n{done.stderr[-3000:]}"
    if output is not None:
        assert _numbers_aside(done.stdout) == _numbers_aside(output.code), \
            f"{output} is not what {chain[0]} prints:\n{done.stdout}"


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "python" and b.mark.startswith("not run")], ids=str)
def test_python_block_not_run_compiles_and_imports(block):
    assert re.fullmatch(r"not run \(.+\)", block.mark), f"{block}: say why it is not run: <!-- check: not run (why) -->"
    tree = ast.parse(block.code)
    imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    exec(compile(ast.Module(body=imports, type_ignores=[]), str(block), "exec"), {})  # noqa: S102 (the docs' own imports)
    import sparsegrad

    for name in re.findall(r"\bsparsegrad\.(\w+)", block.code):
        assert hasattr(sparsegrad, name), f"{block}: sparsegrad.{name} does not exist"


def _commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, split at && and ;."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        tokens, current = shlex.split(line, comments=True), []
        for token in [*tokens, ";"]:
            if token in ("&&", ";", "||", "|"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def _check_command(tokens: list[str], where: str) -> None:
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # VAR=value before the command
        tokens = tokens[1:]
    if not tokens:
        return
    if tokens[0] == "sparsegrad" or "sparsegrad" in tokens[1:2] and tokens[0] == "-m":
        args = tokens[1:]
    elif "-m" in tokens and tokens[tokens.index("-m") + 1:][:1] == ["sparsegrad"]:
        args = tokens[tokens.index("-m") + 2:]
    elif tokens[0] == "make":
        targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
        for target in (t for t in tokens[1:] if "=" not in t and not t.startswith("-")):
            assert target in targets, f"{where}: make {target}: no such target"
        return
    elif tokens[:2] == ["pip", "install"]:
        extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        for spec in tokens[2:]:
            for wanted in re.findall(r"^\.\[([\w,-]+)\]$", spec):
                assert set(wanted.split(",")) <= extras, f"{where}: {spec}: no such extra (have {sorted(extras)})"
        return
    else:
        return
    from sparsegrad.recipes.cli import build_parser

    args = [a for a in args if a != "..."]  # "..." stands for options shown elsewhere
    try:
        build_parser().parse_args(args)
    except SystemExit as exit:
        assert exit.code == 0, f"{where}: `sparsegrad {' '.join(args)}` does not parse (see above)"


@pytest.mark.parametrize("block", [b for b in ALL if b.lang in ("bash", "sh", "console")], ids=str)
def test_shell_block_commands_parse(block, capsys):
    for tokens in _commands(block.code):
        _check_command(tokens, str(block))


@pytest.mark.parametrize("block", [b for b in ALL if b.code.startswith("| task | method |")], ids=str)
def test_summary_table_has_the_command_columns(block):
    from sparsegrad.recipes.results import markdown_table

    assert block.code.splitlines()[0] == markdown_table([]).splitlines()[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"\w+://", target):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which is missing"


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
