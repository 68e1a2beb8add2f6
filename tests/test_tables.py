"""One TOML reader (mmdiag.tables.load_table) behind every table a user can hand mmdiag:
a missing file, a folder, bytes that are not UTF-8 and broken TOML are each one error
naming the file, whichever loader read it."""
from __future__ import annotations

import pytest

from mmdiag.analysis.criteria import load_criteria
from mmdiag.analysis.recommend import load_rules as load_recommend_rules
from mmdiag.errors import MmdiagError, ProfileError
from mmdiag.live.errors import LiveError
from mmdiag.live.rules import parse_rules

LOADERS = {"criteria": (load_criteria, "no such criteria file"),
           "recommend rules": (load_recommend_rules, "no such file")}


@pytest.mark.parametrize("name", LOADERS)
def test_each_loader_says_what_is_wrong_with_the_file_in_one_line(tmp_path, name):
    load, missing = LOADERS[name]
    cases = {tmp_path / "nope.toml": missing, tmp_path: "is a directory, not a",
             tmp_path / "latin1.toml": "not UTF-8", tmp_path / "broken.toml": "invalid TOML"}
    (tmp_path / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    (tmp_path / "broken.toml").write_text("[thresholds\n")
    for path, words in cases.items():
        with pytest.raises(ProfileError) as e:
            load(str(path))
        line = e.value.one_line()
        assert words in line and str(path) in line and "\n" not in line, (name, line)


def test_live_rules_keep_their_wording_and_fix():
    with pytest.raises(LiveError) as e:
        parse_rules("[[rule]\n", "my_rules.toml")
    line = e.value.one_line()
    assert "not TOML" in line and "my_rules.toml" in line and "mmdiag/live/rules.toml" in line
    assert isinstance(e.value, MmdiagError) and e.value.exit_code == 2
