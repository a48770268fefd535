"""What the tests of the scripts in tools/ share: loading one as a module, so that a test calls its
``main(argv)`` in this process (captured output, monkeypatching) rather than in a subprocess."""
import importlib.util
import os
import sys
from types import ModuleType

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` executed afresh as the module ``<name>_tool`` (nothing kept from an earlier load)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (gpu_check's Step) look their module up there
    spec.loader.exec_module(module)
    return module
