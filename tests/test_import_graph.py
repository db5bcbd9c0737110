"""The package's layers (docs: the architecture sketch): each area imports only the areas below it, read from the
source with `ast` (every import, at the top of a module or inside a function), so that no import circle can come back
unnoticed."""

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dreamllm_hf"
BASE = {"constants", "checks", "dtypes", "decoder_conditioning"}  # leaves: they import no other area

# Which areas each area may import (besides itself). An area is a subpackage or a top-level module of `dreamllm_hf`.
ALLOWED = {
    "constants": set(),
    "checks": set(),
    "dtypes": set(),
    "decoder_conditioning": set(),
    "import_notices": set(),  # filters two import-time notices; the package's `__init__` uses it
    "modeling": BASE,
    "model_card": BASE | {"modeling"},
    "building": BASE | {"modeling", "model_card"},
    "training": BASE | {"modeling"},
    "pipelines": BASE | {"modeling", "building"},  # `DreamLLMPipeline.from_components` wraps what building returns
    "conversion": BASE | {"modeling", "model_card", "pipelines"},
    "shapes_world": BASE | {"modeling", "model_card", "pipelines", "training", "conversion"},
    "evaluation": BASE | {"modeling", "pipelines", "shapes_world"},
    "serve": BASE | {"modeling", "pipelines", "shapes_world"},
    "testing_utils": BASE | {"modeling", "pipelines", "conversion", "shapes_world"},
}
# The command line (`dreamllm_hf.cli`, each area's `cli` module, `demo`) and the package's `__init__` sit on top, and so
# do the entry points other tools start: Ray Serve's `serve run dreamllm_hf.serve.ray_deployment:build_application`
# parses the options as `serve --api` does.
TOP = {"cli", "demo", "__init__"}
ENTRY_POINTS = {"dreamllm_hf.serve.ray_deployment"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The `dreamllm_hf` modules (or packages) and the other top-level packages that module `name` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:  # `from .. import constants`: the module, where it is one
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


def area(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "__init__"
    if parts[-1] == "cli" or name in ENTRY_POINTS:
        return "cli"
    return parts[1]


def test_the_allowed_layers_have_no_circle():
    try:
        order = list(TopologicalSorter(ALLOWED).static_order())
    except CycleError as error:
        pytest.fail(f"The table of layers has a circle: {error.args[1]}")
    assert set(order) == set(ALLOWED)
    areas = {area(name) for name in MODULES}
    assert areas - TOP == set(ALLOWED), "every area of the package is in the table, and only those"


@pytest.mark.parametrize("name", [name for name in MODULES if area(name) not in TOP])
def test_each_module_imports_only_the_layers_below_it(name):
    own = area(name)
    # `import dreamllm_hf` (for `__version__`) adds nothing: a submodule is only ever imported after its package.
    wrong = sorted(
        target
        for target in imports(name) - {"dreamllm_hf"}
        if target.split(".")[0] == "dreamllm_hf" and area(target) not in {own, *ALLOWED[own]}
    )
    assert not wrong, f"{name} ({own}) imports {wrong}; {own} may import {sorted(ALLOWED[own])} only"


def test_building_and_modeling_never_import_the_pipelines_and_modeling_never_diffusers():
    for name in MODULES:
        found = imports(name)
        if area(name) in {"building", "modeling"}:
            assert not any(target.startswith("dreamllm_hf.pipelines") for target in found), name
        if area(name) == "modeling":
            assert not any(target.split(".")[0] == "diffusers" for target in found), name


def test_the_package_never_imports_the_research_projects():
    for name in MODULES:
        assert not any(target.split(".")[0] == "shapes_world_v2" for target in imports(name)), name
