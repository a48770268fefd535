"""The registries of the installed plugins, built once per test run and shared by every test that only reads
them: the ``registries`` fixture of tests/conftest.py, and test modules that need registered names while pytest
collects them (to parametrise over). A test that changes registries, or what they are built from (extra
plugins, ``DETKIT_*`` variables, ``sys.path``), builds its own: ``get_registries(get_plugin_manager(...))``."""
import functools

from detkit.plugins import Registries, get_registries


@functools.cache
def shared_registries() -> Registries:
    """The installed plugins' registries, built on the first call (at collection, or by the first test that asks
    for the session fixture, before any of that test's own fixtures change the environment)."""
    return get_registries()
