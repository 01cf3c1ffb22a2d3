"""The architecture as a test: imports run one way down the layers, nothing imports
torch before it must, and the shipped configs stay real."""
import ast
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Lower number = higher layer.  A module may import its own layer's modules (no cycle),
# or any layer with a larger number; students and losses are independent of each other.
LAYERS = {"cli": 0, "distill": 1, "teachers": 2, "students": 3, "losses": 3, "common": 4}
# Inside distill: the command functions on top, then report, the training code, and the
# setup, data and config every stage shares.
DISTILL = {"distill.demo": 0, "distill.stages": 1, "distill.report": 2, "distill.train": 3, "distill.runtime": 4,
           "distill.prompts": 4, "distill.data": 5, "distill.packing": 5, "distill.blocks": 5, "distill.chat": 5,
           "distill.config": 6, "distill.layout": 7}


def project_modules() -> dict[str, Path]:
    mods = {"cli": ROOT / "cli.py"}
    for pkg in ("common", "distill", "teachers", "students", "losses"):
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def imports_of(name: str, path: Path) -> set[str]:
    """Project modules `name` imports anywhere in its file (lazy imports included)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in LAYERS}


def owner(mod: str, table: dict[str, int]) -> str | None:
    return next((k for k in sorted(table, key=len, reverse=True) if mod == k or mod.startswith(k + ".")), None)


def test_imports_only_run_down_the_layers():
    mods = project_modules()
    wrong = []
    for name, path in mods.items():
        me = LAYERS[name.split(".")[0]]
        for dep in imports_of(name, path):
            top = dep.split(".")[0]
            if top == name.split(".")[0]:
                if top == "distill":
                    a, b = owner(name, DISTILL), owner(dep, DISTILL)
                    if a and b and a != b and DISTILL[b] < DISTILL[a]:
                        wrong.append(f"{name} -> {dep} (up inside distill)")
                continue
            if LAYERS[top] <= me:
                wrong.append(f"{name} -> {dep}")
    assert not wrong, "upward or sideways imports:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    mods = project_modules()
    graph = {n: {d for d in imports_of(n, p) if d in mods and d != n} for n, p in mods.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle of meaning.
    graph = {n: {d for d in ds if not d.startswith(n + ".")} for n, ds in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return set(out)


def test_cli_import_and_config_validation_import_no_torch():
    mods = _modules_after("import cli")
    assert "torch" not in mods and "transformers" not in mods
    mods = _modules_after("from distill.config import load_config\n"
                          f"load_config({str(ROOT / 'configs' / 'demo.yaml')!r})")
    assert "torch" not in mods and "transformers" not in mods


def test_distill_help_answers_without_torch():
    code = ("import sys, cli\nsys.argv = ['distill', '--help']\ntry:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "pretrain" in proc.stdout and "inspect" in proc.stdout


def test_importing_the_packages_sets_no_environment():
    # The libraries below set variables of their own on import; ours must add none.
    code = ("import os, torch, datasets, deepspeed, matplotlib, rich, typer\n"
            "from transformers import AutoModelForCausalLM, LlamaForCausalLM, Llama4ForCausalLM\n"
            "before = dict(os.environ)\nimport distill, distill.stages, teachers, students, losses\n"
            "changed = sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k))\n"
            "assert not changed, changed")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_shipped_configs_exist_and_the_demo_file_is_the_demo():
    from distill.demo import demo_config

    names = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert {"demo.yaml", "checkpoint_teacher.yaml", "deepspeed_multi_gpu.yaml"} <= names
    from_file = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    assert from_file == demo_config(Path("../runs/demo"), "quick") | {"out_dir": "../runs/demo"}
