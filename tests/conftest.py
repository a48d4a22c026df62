"""The tests' fixtures are in tests/harness.py, loaded in each process that runs
tests: not in pytest-xdist's controller, which only hands tests out to its workers
(importing the app and the fixtures there cost ~1.3 s of CPU before any worker
started)."""

import pytest


@pytest.hookimpl(trylast=True)  # after pytest-xdist's, which registers "dsession"
def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("dsession"):
        config.pluginmanager.import_plugin("harness")
