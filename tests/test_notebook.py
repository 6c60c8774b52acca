"""notebooks/quickstart.ipynb: valid nbformat 4, every download tagged, the offline cells run.

nbformat / nbclient are not dependencies: the notebook is read as JSON and its offline code cells
are executed in order in this process, in one shared namespace (shell `!` and magic `%` lines
skipped), with DIT_JAX_QUICK=1 so the notebook samples few images with few steps.
"""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import dit_jax  # noqa: F401  (flax, imported first, looks for IPython itself: it must find the real one)

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
ONLINE = "needs-internet"
# What only an online cell may do: install, download, convert the downloads, use the converted bundle.
ONLINE_MARKERS = ("pip install", "wget ", "hf download", "huggingface-cli", "convert.dit", "ckpts/")


@pytest.fixture(scope="module")
def notebook() -> dict:
    return json.loads(NOTEBOOK.read_text())


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _online(cell: dict) -> bool:
    return ONLINE in cell["metadata"].get("tags", [])


def test_is_a_clean_nbformat_4_notebook(notebook):
    assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 5
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    ids = [cell["id"] for cell in notebook["cells"]]
    assert len(set(ids)) == len(ids)  # nbformat 4.5 cell ids, unique
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["source"], list) and all(isinstance(line, str) for line in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None  # committed without outputs


def test_every_download_is_tagged(notebook):
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    for cell in code:
        if any(marker in _source(cell) for marker in ONLINE_MARKERS):
            assert _online(cell), f"cell {cell['id']} needs the internet or its downloads: tag it {ONLINE!r}"
    online = "\n".join(_source(cell) for cell in code if _online(cell))
    assert 'pip install -q "dit-jax[convert,text,cuda] @ git+' in online
    assert "wget -nc https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in online
    assert "download stabilityai/sd-vae-ft-ema --local-dir sd-vae-ft-ema" in online
    assert "python -m convert.dit DiT-XL-2-256x256.pt ckpts/dit-xl-2-256 --vae sd-vae-ft-ema" in online
    assert 'load("ckpts/dit-xl-2-256", dtype="auto")' in online and '"golden retriever"' in online


def test_offline_cells_run(notebook, monkeypatch, capsys):
    shown = []  # what the notebook displays
    try:
        import IPython.display

        monkeypatch.setattr(IPython.display, "display", shown.append)
    except ImportError:  # IPython is not a test dependency: a stand-in module
        stand_in = types.ModuleType("IPython.display")
        stand_in.display = shown.append
        monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
        monkeypatch.setitem(sys.modules, "IPython.display", stand_in)
    monkeypatch.setenv("DIT_JAX_QUICK", "1")

    namespace = {"__name__": "__main__"}
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code" or _online(cell):
            continue
        lines = [line for line in cell["source"] if not line.lstrip().startswith(("!", "%"))]
        exec(compile("".join(lines), f"{NOTEBOOK.name}:{cell['id']}", "exec"), namespace)

    assert namespace["QUICK"] is True
    rows, names = namespace["rows"], list(namespace["timings"])
    assert names == ["baseline", "SDTM", "SDTM protected", "ToMe 0.5"] and len(rows) == 4
    assert all(row.shape == (4, 32, 32, 1) and row.dtype == np.uint8 for row in rows)
    assert not np.array_equal(rows[0], rows[3])  # merging changed something
    grid, dresses = shown[0], shown[1]
    assert grid.size == (4 * 32 * 3, 4 * 32 * 3) and dresses.size == (4 * 32 * 3, 32 * 3)  # upscaled 3x
    printed = capsys.readouterr().out
    assert "first call" in printed and "x the baseline's speed" in printed
