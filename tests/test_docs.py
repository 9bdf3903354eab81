"""The documentation's runnable blocks run, and do what they say.

A fenced ``bash``/``sh`` or ``python`` block of README.md, CONTRIBUTING.md or
docs/*.md is runnable when the line before its fence is
``<!-- runnable creates=FILE,FILE -->`` (``runnable slow`` for one that takes
more than a few seconds; see CONTRIBUTING.md). Each runs in a fresh temporary
folder holding a copy of the repository's ``examples/``, with this
environment's ``fps-onnx`` and ``python`` first on PATH; it must exit 0 and
create every file it names, and each of those must read back (a mask file
through :meth:`MaskFile.load`, a stats file through :meth:`Stats.load`, JSON
through ``json``).
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import os
from pathlib import Path
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from fps_onnx.selection.maskfile import MaskFile
from fps_onnx.stats import Stats

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
MARKER = re.compile(r"<!--\s*runnable(?P<slow>\s+slow)?(?:\s+creates=(?P<creates>\S+?))?\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
LANGS = {"bash": "bash", "sh": "bash", "python": "python"}


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str  # "bash" or "python"
    code: str
    creates: tuple[str, ...]
    slow: bool

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def _blocks(doc: Path) -> list[Block]:
    """Runnable blocks of one document, in order; a marker not followed by a runnable fence is an error.

    Markers inside another fenced block (an example of the syntax) are text, not markers.
    """
    lines = doc.read_text(encoding="utf-8").splitlines()
    found, i, open_fence = [], 0, ""
    while i < len(lines):
        line = lines[i].strip()
        ticks = len(line) - len(line.lstrip("`"))
        if open_fence:  # a fence closes with at least as many backticks and nothing after them
            if ticks >= len(open_fence) and not line.strip("`"):
                open_fence = ""
        elif ticks >= 3:
            open_fence = "`" * ticks
        elif (marker := MARKER.fullmatch(line)) is not None:
            fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            if fence is None or fence.group(1) not in LANGS:
                raise AssertionError(f"{doc.name}:{i + 1}: runnable marker not followed by a bash or python fence")
            end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise AssertionError(f"{doc.name}:{i + 2}: runnable block never closed")
            creates = tuple(filter(None, (marker.group("creates") or "").split(",")))
            found.append(Block(doc, i + 2, LANGS[fence.group(1)], "\n".join(lines[i + 2:end]) + "\n",
                               creates, bool(marker.group("slow"))))
            i = end
        i += 1
    return found


BLOCKS = [block for doc in DOCS for block in _blocks(doc)]


def _run(code: str, lang: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONWARNINGS": "ignore"}
    if lang == "python":
        (cwd / "block.py").write_text(code, encoding="utf-8")
        cmd = [sys.executable, "block.py"]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _check_reads_back(path: Path) -> None:
    """A created file is more than a name: it reads back as what it is."""
    assert path.is_file() and path.stat().st_size > 0, f"{path.name} is missing or empty"
    if path.suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "np") as fh:
            kind = (fh.metadata() or {}).get("format")
            assert list(fh.keys()), f"{path.name} holds no tensor"
        if kind == "fps-mask":
            masks = MaskFile.load(path)
            assert 0 < masks.selected < masks.total, f"{path.name} selects {masks.selected} of {masks.total}"
        elif kind == "fps-stats":
            assert Stats.load(path).num_samples >= 1


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A fresh folder with a copy of the repository's examples (blocks may write anywhere in it)."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    return tmp_path


def _param(block: Block):
    return pytest.param(block, id=block.id, marks=[pytest.mark.slow] if block.slow else [])


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_runnable_block(block: Block, sandbox: Path):
    result = _run(block.code, block.lang, sandbox)
    assert result.returncode == 0, f"{block.id} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    for name in block.creates:
        _check_reads_back(sandbox / name)


def _ci_command(name: str) -> str:
    """A command string `.ci/run` greps README.md for (and then runs)."""
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    return shlex.split(re.search(rf"^{name}=(.*)$", text, re.M).group(1))[0]


def test_readme_shows_the_commands_ci_runs_and_its_select_part_runs(sandbox: Path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install, test_cmd = _ci_command("install"), _ci_command("test_cmd")
    assert install in readme and test_cmd in readme
    select = install.split("&&")[-1].strip()  # the install itself is CI's to run
    assert select.startswith(".venv/bin/fps-onnx select ")
    result = _run(select.removeprefix(".venv/bin/"), "bash", sandbox)
    assert result.returncode == 0, result.stderr
    _check_reads_back(sandbox / "masks.safetensors")


def test_every_runnable_block_names_what_it_creates():
    assert BLOCKS, "no runnable block found"
    assert [b.id for b in BLOCKS if not b.creates] == []
    assert {b.doc.name for b in BLOCKS} >= {"README.md"}


def test_readme_fits_on_a_few_screens():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 150


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    text = doc.read_text(encoding="utf-8")
    targets = re.findall(r"\]\((?!https?://|#|mailto:)([^)#\s]+)", text)
    missing = [t for t in targets if not (doc.parent / t).exists()]
    assert missing == []


def test_a_marker_without_a_fence_is_refused(tmp_path: Path):
    doc = tmp_path / "x.md"
    doc.write_text("<!-- runnable creates=a -->\nnot a fence\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="not followed by a bash or python fence"):
        _blocks(doc)
    doc.write_text("<!-- runnable slow creates=a,b -->\n```bash\necho hi\n```\n", encoding="utf-8")
    (block,) = _blocks(doc)
    assert (block.lang, block.code, block.creates, block.slow, block.line) == ("bash", "echo hi\n", ("a", "b"), True, 2)
    doc.write_text("````markdown\n<!-- runnable creates=a -->\n```bash\necho hi\n```\n````\n", encoding="utf-8")
    assert _blocks(doc) == []  # an example of the syntax, inside another fence
