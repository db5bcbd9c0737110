"""Every Python and shell snippet of README.md and docs/*.md runs here on the shipped demo model, so the docs cannot
drift from the code.

A snippet that needs what a test machine lacks says so in an HTML comment on the line right before its fence, and is
then only parsed (Python with `ast.parse`, shell with `bash -n`):

    <!-- snippet: needs-gpu -->      a CUDA device
    <!-- snippet: needs-7b -->       the converted 7B release, or other weights or data that do not ship
    <!-- snippet: needs-server -->   a running server (`dreamllm-hf serve`, the API): covered by their own tests
    <!-- snippet: slow -->           minutes of CPU, or a set-up step (pip, a fresh virtualenv)
    <!-- snippet: output -->         not code: what a snippet prints (not even parsed)

Unmarked ```python / ```py / ```bash / ```sh / ```shell blocks are run, page by page, in a temporary folder with
`HF_HUB_OFFLINE=1` and one thread: a page's Python snippets in order in one process (so a snippet may use what an
earlier one of its page defined), its shell snippets with `bash -e` in between, in the same folder. Other fences
(json, yaml, text, none) are not code to run.
"""

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

MARKERS = {"needs-gpu", "needs-7b", "needs-server", "slow", "output"}
LANGUAGES = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}

MARKER_LINE = re.compile(r"^\s*<!--\s*snippet:\s*(?P<kind>[^\s>]+)\s*-->\s*$")
ANY_MARKER = re.compile(r"<!--\s*snippet\b")
FENCE_OPEN = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


@dataclass
class Snippet:
    page: str  # relative to the repository
    line: int  # the first line of code (1-based), for tracebacks that point into the page
    info: str  # the fence's language word, lowercased
    marker: str | None
    source: str

    @property
    def language(self) -> str | None:
        return LANGUAGES.get(self.info)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def read_snippets(page: Path) -> list[Snippet]:
    """The fenced blocks of `page`, each with the marker on the line before it; a stray or unknown marker raises."""
    lines = page.read_text(encoding="utf-8").splitlines()
    name = str(page.relative_to(REPO))
    snippets, number = [], 0
    while number < len(lines):
        line = lines[number]
        opening = FENCE_OPEN.match(line)
        if ANY_MARKER.search(line):
            marked = MARKER_LINE.match(line)
            if marked is None or marked["kind"] not in MARKERS:
                raise ValueError(
                    f"{name}:{number + 1}: {line.strip()!r} is not a snippet marker; write one of "
                    f"{', '.join(f'<!-- snippet: {kind} -->' for kind in sorted(MARKERS))}"
                )
            if number + 1 >= len(lines) or not FENCE_OPEN.match(lines[number + 1]):
                raise ValueError(f"{name}:{number + 1}: a snippet marker must be on the line right before a ``` fence")
        if opening is None:
            number += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = (opening["info"].split() or [""])[0].lower()
        previous = MARKER_LINE.match(lines[number - 1]) if number else None
        body, end = [], number + 1
        while end < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]):
            body.append(lines[end][len(indent) :] if lines[end].startswith(indent) else lines[end].lstrip())
            end += 1
        if end == len(lines):
            raise ValueError(f"{name}:{number + 1}: the fence opened here is never closed")
        snippets.append(
            Snippet(name, number + 2, info, previous["kind"] if previous else None, "\n".join(body) + "\n")
        )
        number = end + 1
    return snippets


def _read_all() -> tuple[dict, list[str]]:
    snippets, errors = {}, []
    for page in PAGES:
        try:
            snippets[page] = read_snippets(page)
        except ValueError as error:
            snippets[page], errors = [], [*errors, str(error)]
    return snippets, errors


SNIPPETS, READ_ERRORS = _read_all()
RUN_PAGES = [page for page, snippets in SNIPPETS.items() if any(s.language and not s.marker for s in snippets)]
MARKED = [s for snippets in SNIPPETS.values() for s in snippets if s.language and s.marker and s.marker != "output"]

# Runs one page's snippets in order in this process: Python in one namespace, compiled under the page's name and line
# numbers (a traceback points into the page), shell with `bash -e` in the same folder.
DRIVER = """
import json, subprocess, sys, time
namespace = {"__name__": "__main__"}
for number, snippet in enumerate(json.load(open(sys.argv[1]))):
    print(f"--- {snippet['page']}:{snippet['line']}", flush=True)
    start = time.perf_counter()
    if snippet["language"] == "python":
        exec(compile("\\n" * (snippet["line"] - 1) + snippet["source"], snippet["page"], "exec"), namespace)
    else:
        script = f"snippet-{number}-line-{snippet['line']}.sh"
        open(script, "w").write(snippet["source"])
        if subprocess.run(["bash", "-e", "-o", "pipefail", script]).returncode:
            sys.exit(f"{snippet['page']}:{snippet['line']}: the shell snippet failed")
    print(f"--- {snippet['page']}:{snippet['line']} ran in {time.perf_counter() - start:.1f} s", flush=True)
"""


def _environment() -> dict:
    bin_dir = str(Path(sys.executable).parent)  # `python` and `dreamllm-hf` as this interpreter's
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONWARNINGS="ignore",
        PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
    )


def test_markers_and_fences_are_well_formed():
    assert not READ_ERRORS, "\n".join(READ_ERRORS)


def test_every_page_has_its_snippets_found():
    """The reader finds the README's snippets (a broken fence pattern would make every other test here vacuous)."""
    readme = SNIPPETS[REPO / "README.md"]
    assert sum(s.language == "python" and s.marker is None for s in readme) >= 2
    assert any(s.marker == "needs-7b" for s in readme)


def test_reader_keeps_markers_and_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n<!-- snippet: needs-gpu -->\n```python\nx = 1\n```\n\n- item:\n\n  ```bash\n  echo hi\n  ```\n"
    )
    first, second = read_snippets(page)
    assert (first.marker, first.language, first.line, first.source) == ("needs-gpu", "python", 5, "x = 1\n")
    assert (second.marker, second.language, second.line, second.source) == (None, "shell", 11, "echo hi\n")
    page.write_text("<!-- snippet: needs-gpus -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="not a snippet marker"):
        read_snippets(page)
    page.write_text("<!-- snippet: slow -->\n\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="right before"):
        read_snippets(page)


@pytest.mark.parametrize("snippet", MARKED, ids=[s.where for s in MARKED])
def test_marked_snippet_parses(snippet, tmp_path):
    """A snippet that cannot run here is at least valid Python or shell."""
    if snippet.language == "python":
        ast.parse(snippet.source, filename=snippet.where)
    else:
        script = tmp_path / "snippet.sh"
        script.write_text(snippet.source)
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{snippet.where}: {check.stderr}"


def run_snippets(snippets: list[Snippet], folder: Path) -> subprocess.CompletedProcess:
    """Runs `snippets` (one page's, in order) through `DRIVER` in `folder/work`."""
    spec = folder / "snippets.json"
    spec.write_text(json.dumps([dict(asdict(s), language=s.language) for s in snippets]))
    work = folder / "work"
    work.mkdir()
    return subprocess.run(
        [sys.executable, "-c", DRIVER, str(spec)],
        cwd=work,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_broken_snippet_fails_and_names_its_line(tmp_path, monkeypatch):
    """Snippets of a page share one namespace and one folder; the first that fails stops the run, named by its line."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nvalue = 41\n```\n\n```bash\necho done > shell.txt\n```\n\n"
        "```python\nassert open('shell.txt').read() == 'done\\n'\nvalue += 1\n```\n"
    )
    (tmp_path / "good").mkdir()
    assert run_snippets(read_snippets(page), tmp_path / "good").returncode == 0
    page.write_text(page.read_text() + "\n```python\nassert value == 41, 'stale'\n```\n")
    (tmp_path / "python").mkdir()
    failed = run_snippets(read_snippets(page), tmp_path / "python")
    assert failed.returncode != 0 and 'page.md", line 15' in failed.stderr and "stale" in failed.stderr
    page.write_text("```sh\nfalse\necho not reached\n```\n")
    (tmp_path / "shell").mkdir()
    failed = run_snippets(read_snippets(page), tmp_path / "shell")
    assert failed.returncode != 0 and "not reached" not in failed.stdout and "page.md:2" in failed.stderr


@pytest.mark.parametrize("page", RUN_PAGES, ids=[str(page.relative_to(REPO)) for page in RUN_PAGES])
def test_page_snippets_run(page, tmp_path):
    """The page's unmarked snippets run, in order, on the shipped demo model, offline."""
    run = run_snippets([s for s in SNIPPETS[page] if s.language and not s.marker], tmp_path)
    assert run.returncode == 0, f"{page.name}: a snippet failed\n{run.stdout[-4000:]}\n{run.stderr[-6000:]}"
