"""The README is for users: its configuration reference is the code's, and it keeps no diary."""

from __future__ import annotations

import re
from pathlib import Path

from serve_app.config import Settings
from serve_app.config_reference import README, readme_block, render

TEXT = README.read_text()


def test_the_configuration_reference_is_generated_from_the_models():
    assert readme_block(TEXT) == render(), (
        "README.md's configuration reference is stale: python -m serve_app.config_reference "
        "--write")


def test_every_setting_is_in_the_reference_once():
    documented = re.findall(r"^\| `[a-z0-9_]+` \| `(SERVE_APP_[A-Z0-9_]+)` \|", render(), re.M)
    assert sorted(documented) == sorted(f"SERVE_APP_{n.upper()}" for n in Settings.model_fields)


def test_it_stays_short():
    # The rest goes to the guides (deploy/*.md), docs/ and CONTRIBUTING.md.
    assert len(TEXT.splitlines()) < 200


def test_it_starts_with_the_two_commands():
    first_block = TEXT.split("```")[1]
    assert [line.split()[:2] for line in first_block.strip().splitlines()[1:]] == [
        ["make", "serve"], ["make", "test"]]


def test_no_dated_notes_or_issue_numbers():
    for pattern in (r"\b20\d\d-\d\d-\d\d\b", r"\btoday\b", r"\bissue #?\d+", r"#\d+\b"):
        assert not re.search(pattern, TEXT, re.I), pattern


def test_performance_stays_a_summary_that_links_the_measurements():
    section = TEXT.split("## Performance\n", 1)[1].split("\n## ", 1)[0]
    assert len(section.strip().splitlines()) <= 15
    assert "docs/performance.md" in section
    assert (Path(README).parent / "docs" / "performance.md").is_file()
