"""The README's "compose it yourself" snippet runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_compose_snippet_runs():
  text = README.read_text()
  m = re.search(r"<!-- compose-snippet -->\s*```python\n(.*?)```", text, re.S)
  assert m, "README lost its compose-it-yourself snippet"
  code = m.group(1)
  assert "tapjax.replace" in code and "tapjax.masked_mean" in code
  exec(compile(code, "README-snippet", "exec"), {})
