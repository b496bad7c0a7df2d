"""Every command in README.md and docs/*.md works: tests/docs_runner.py runs each page's commands in order in a scratch
project (tiny settings, the tiny pipeline and tiny stand-in files where a page needs SD or unshipped data; see its
docstring). The lab notebook's pages (docs/notes/) run the one-off studies: experiments/tests/test_notes.py runs them
the same way, off the default test run."""
from __future__ import annotations

import pytest

from docs_runner import page_groups, run_pages


@pytest.mark.slow(minutes=5)
@pytest.mark.parametrize("group", page_groups())
def test_every_command_of_the_page_works(group, tmp_path, tiny_pipeline, monkeypatch, one_thread):
    proj = run_pages(group, tmp_path, tiny_pipeline, monkeypatch)
    if "docs/evaluation.md" in group:  # what the generation and evaluation pages' commands wrote
        assert len(list((proj / "outputs" / "body" / "sdd").glob("000*.png"))) == 3  # TINY: 3 prompts x 1 image
        assert (proj / "outputs" / "country_body" / "pipe_sld-max" / "metadata.csv").is_file()  # the reference's
        assert (proj / "outputs" / "i2p_sexual" / "sd" / "nudity_summary.json").is_file()
        assert "SDD" in (proj / "outputs" / "report" / "report.md").read_text()
