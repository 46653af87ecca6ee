"""`tf.test.TestCase` ships a `test_session` context manager that pytest would collect
and report as a skipped test; it is not one of ours, so it is deselected."""

from __future__ import annotations


def pytest_collection_modifyitems(config, items):
    ours = [item for item in items if item.name != "test_session"]
    if len(ours) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.name == "test_session"])
        items[:] = ours
