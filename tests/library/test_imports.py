"""The library floor: `import sparsegrad` needs torch, safetensors and transformers only, and no
library module imports the recipes or the benchmarks."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import sparsegrad

HEAVY = ("optuna", "sklearn", "scipy", "peft", "accelerate", "datasets", "matplotlib", "sparsegrad.recipes",
         "sparsegrad.bench")


def test_importing_the_library_loads_no_recipe_dependency():
    code = ("import json, sys, sparsegrad, sparsegrad.adapter, sparsegrad.basis, sparsegrad.layer, sparsegrad.model, "
            "sparsegrad.optim, sparsegrad.targets, sparsegrad.support, sparsegrad.util; "
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_library_modules_never_import_the_floors_above():
    library = Path(sparsegrad.__file__).parent
    for path in library.glob("*.py"):
        if path.name == "__main__.py":  # `python -m sparsegrad`: the command's entry point, run, never imported
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                assert not module.lstrip(".").startswith(("recipes", "bench", "sparsegrad.recipes",
                                                          "sparsegrad.bench")), f"{path.name} imports {module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(("sparsegrad.recipes", "sparsegrad.bench")), path.name
