"""Every command of the lab notebook (docs/notes/*.md) works: the one-off studies' commands, run by the documentation
runner (tests/docs_runner.py) with tiny settings in a scratch project, as tests/test_docs.py runs the user pages'."""
from __future__ import annotations

import pytest

from docs_runner import page_groups, run_pages


@pytest.mark.parametrize("group", page_groups(notes=True))
def test_every_command_of_the_notes_page_works(group, tmp_path, tiny_pipeline, monkeypatch, one_thread):
    run_pages(group, tmp_path, tiny_pipeline, monkeypatch)
