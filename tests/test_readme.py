"""The README's Python examples run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README lost its Python example"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "api" / "genotype.json").exists()
    assert (tmp_path / "darts_v2.json").exists()
    assert namespace["genotype"].steps == 4


@pytest.mark.slow
def test_readme_method_example_runs(tmp_path, monkeypatch):
    from fastdarts.method import unregister_method

    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "register_method" in b)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    try:
        exec(compile(block, "README.md", "exec"), namespace)
    finally:
        unregister_method("alpha-decay")
    entry = (tmp_path / "runs" / "decay" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"alpha_norm"' in entry and '"alpha_decay": 5.0' in entry
