"""Every command in README.md and docs/*.md works: tests/docs_runner.py runs each page's commands in order in a scratch
project (tiny settings, the tiny pipeline and tiny stand-in files where a page needs SD or unshipped data; see its
docstring). The lab notebook's pages (docs/notes/) run the one-off studies: experiments/tests/test_notes.py runs them
the same way, off the default test run."""
from __future__ import annotations

import functools
import re

import pytest

from docs_runner import page_groups, run_pages
from docs_util import ROOT, pages, prose

LINK = re.compile(r"\]\(([^)\s]+)\)")  # a Markdown link's target: [text](page.md#anchor)


@functools.cache  # each page's headings read once, however many links point into it
def anchors(page) -> set[str]:
    """The anchors a Markdown renderer gives a page's headings (GitHub's rule: lower case, punctuation dropped)."""
    heads = re.findall(r"^#+ (.*)$", prose(page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", [p.relative_to(ROOT) for p in pages() + pages(notes=True)], ids=str)
def test_every_link_between_pages_resolves(page):
    """Each relative link names a file that exists and, into a page, a heading it has (sections move between pages)."""
    broken = []
    for target in LINK.findall(prose((ROOT / page).read_text()).replace("\n", " ")):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = ((ROOT / page).parent / path).resolve() if path else ROOT / page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert not broken, f"{page}: broken links {broken}"


@pytest.mark.slow(minutes=5)
@pytest.mark.parametrize("group", page_groups())
def test_every_command_of_the_page_works(group, tmp_path, tiny_pipeline, monkeypatch, one_thread):
    proj = run_pages(group, tmp_path, tiny_pipeline, monkeypatch)
    if "docs/evaluation.md" in group:  # what the generation and evaluation pages' commands wrote
        assert len(list((proj / "outputs" / "body" / "sdd").glob("000*.png"))) == 3  # TINY: 3 prompts x 1 image
        assert (proj / "outputs" / "country_body" / "pipe_sld-max" / "metadata.csv").is_file()  # the reference's
        assert (proj / "outputs" / "i2p_sexual" / "sd" / "nudity_summary.json").is_file()
        assert "SDD" in (proj / "outputs" / "report" / "report.md").read_text()
