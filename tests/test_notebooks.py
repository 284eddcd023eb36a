"""The notebooks are committed clean and in reading order; nbmake runs them
(`pytest --nbmake notebooks/`, part of `make test`)."""

import json
import re
from pathlib import Path

import pytest

from ddetr_tutorial.notebook import fast_mode

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_numbered_notebooks_run_from_00_without_gaps():
    numbers = [int(re.match(r"(\d\d)_", p.name).group(1)) for p in NOTEBOOKS
               if re.match(r"\d\d_", p.name)]
    assert numbers == list(range(len(numbers))), [p.name for p in NOTEBOOKS]
    names = {p.name for p in NOTEBOOKS}
    new = {"10_assemble_the_detector.ipynb", "11_from_deformable_convolution.ipynb"}
    assert new <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in nb["metadata"], f"{path.name} carries widget state"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_teaches_checks_and_offers_exercises(path):
    nb = json.loads(path.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "fast_mode()" in code, f"{path.name} ignores DDETR_FAST"
    assert "assert_close" in code, f"{path.name} never checks itself against the library"
    assert re.search(r"try this", text, re.IGNORECASE), f"{path.name} has no 'Try this' list"
    for forbidden in ("urlretrieve", "requests.get", "torch.hub", "wget ", "curl "):
        assert forbidden not in code, f"{path.name} downloads ({forbidden!r})"


@pytest.mark.parametrize("env, expected", [({}, False), ({"CI": "true"}, True),
                                           ({"CI": "true", "DDETR_FAST": "0"}, False),
                                           ({"DDETR_FAST": "1"}, True)])
def test_fast_mode(monkeypatch, env, expected):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("DDETR_FAST", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert fast_mode() is expected


def test_fast_mode_rejects_other_values(monkeypatch):
    monkeypatch.setenv("DDETR_FAST", "yes")
    with pytest.raises(ValueError, match="DDETR_FAST must be '0' or '1', got 'yes'"):
        fast_mode()
