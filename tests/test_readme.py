"""The README's Python examples run as written (```python blocks; ```py marks examples that need the Hub)."""

import re
from pathlib import Path


def test_readme_python_examples_run(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks
    monkeypatch.chdir(tmp_path)  # the examples save into the working directory
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "my-detector" / "config.json").is_file()
