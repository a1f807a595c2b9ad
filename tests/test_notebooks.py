"""The notebooks as committed: outputs cleared, learning goals first, exercises with checking
cells, and the public API only. (`make test` also runs each of them top to bottom.)"""

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_the_seven_labs():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_notebook_is_committed_clean_and_shaped_for_class(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs"
    opening = "".join(c.source for c in nb.cells[:3] if c.cell_type == "markdown")
    assert "Learning goals" in opening
    source = "\n".join(c.source for c in code)
    answers = re.findall(r"^(answer_\d+) = None\b", source, re.M)
    assert len(answers) >= 2, "two or three exercises, each answered in a variable"
    for answer in answers:  # each has a checking cell that handles the unanswered case
        assert re.search(rf"if {answer} is None:", source), answer
    # The public API only: no private names imported or reached into.
    assert not re.search(r"import\s+_|import .*\b_[a-z]\w*|\._[a-z]\w*", source)
