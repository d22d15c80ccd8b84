"""The README stays a front door, and the documentation's relative links lead somewhere.

* README.md has at most 160 lines (everything else lives in docs/ and benchmarks/README.md);
* every relative link and image in README.md, docs/*.md and benchmarks/README.md names a file
  that exists, and a ``#fragment`` into a Markdown file names one of its headings (GitHub's
  anchors);
* the README's two set-up commands are what ``.ci/run`` runs: the test command verbatim, and the
  main job's command installs the same pinned torch and torchvision into a fresh virtual
  environment.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
MAX_README_LINES = 160

#: [text](target) and ![alt](target), with an optional "title"; <img src="target">
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The page without fenced code blocks and HTML comments (links there are not links)."""
    return HTML_COMMENT.sub("", FENCE.sub("", text))


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page: lower case, punctuation dropped (``-`` and
    ``_`` kept), spaces to hyphens; a repeated heading gets ``-1``, ``-2``, …"""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _relative_links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", _prose(page.read_text(encoding="utf-8")))
    targets = MD_LINK.findall(text) + HTML_SRC.findall(text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, mailto:, …


def _bash_blocks(section: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move the detail to docs/")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_an_existing_file(page: Path) -> None:
    assert page.exists(), page
    links = _relative_links(page)
    broken = []
    for link in links:
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no file {target}")
        elif fragment and target.suffix == ".md" and fragment not in _anchors(target):
            broken.append(f"{link}: no heading #{fragment} in {target.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_pages_link_to_each_other() -> None:
    """Something to check: the README links every docs page, and the image links are found."""
    readme_targets = {(ROOT / link.partition("#")[0]).resolve() for link in _relative_links(README)}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in readme_targets]
    assert not unlinked, f"README.md does not link {unlinked}"
    images = [link for p in PAGES for link in _relative_links(p) if link.endswith(".png")]
    assert images and all(link.startswith("img/") or link.startswith("../docs/img/") for link in images), images


def test_the_readme_set_up_commands_are_what_ci_runs() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Two commands on a fresh machine")
    end = text.index("\n## ", start + 1)
    main_job, test_command = _bash_blocks(text[start:end])
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
                if line.startswith("python3 -m venv")]
    assert ci_lines == [test_command], "the README's test command is not the one .ci/run runs"

    def setup(command: str) -> tuple[list[str], list[str]]:
        """The venv step and the pinned torch/torchvision of an install command line."""
        steps = [shlex.split(s) for s in command.split("&&")]
        pip = next(s for s in steps if s[:2] == ["pip", "install"])
        return steps[0], [a for a in pip if a.startswith(("torch==", "torchvision=="))]

    assert setup(main_job) == setup(test_command)
    assert setup(test_command)[1] and main_job.endswith("python -m cure_eval.defend --model wide_resnet --method cure")
