"""The core stays model-agnostic: no heavy imports, no task-name string logic."""

import ast
import pathlib
import subprocess
import sys

CORE = sorted((pathlib.Path(__file__).parents[1] / "tapjax").glob("*.py"))
TASK_WORDS = ("classif", "generat", "image", "text", "vqa", "caption", "news", "token")


def test_import_tapjax_loads_no_heavy_framework():
  code = (
    "import sys, tapjax\n"
    "bad = sorted({m.split('.')[0] for m in sys.modules} & "
    "{'flax', 'orbax', 'tensorflow', 'transformers', 'torch', 'tensorflow_datasets'})\n"
    "print(','.join(bad))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "", f"import tapjax loaded: {out.stdout}"


def test_core_imports_only_jax_optax_numpy():
  allowed = {
    "jax",
    "optax",
    "numpy",
    "tapjax",
    "__future__",
    "dataclasses",
    "enum",
    "functools",
    "re",
    "typing",
    "collections",
    "math",
  }
  for path in CORE:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        mods = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        mods = [node.module or ""]
      else:
        continue
      for m in mods:
        assert m.split(".")[0] in allowed, f"{path.name} imports {m}"


def test_no_task_name_strings_in_core():
  """No string literal (docstrings aside) in the core mentions a task or modality."""
  assert CORE, "core modules not found"
  for path in CORE:
    tree = ast.parse(path.read_text())
    docstrings = {
      id(n.body[0].value)
      for n in ast.walk(tree)
      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
      and n.body
      and isinstance(n.body[0], ast.Expr)
      and isinstance(n.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
      if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
        low = node.value.lower()
        assert not any(w in low for w in TASK_WORDS), f"{path.name}: string {node.value!r}"
