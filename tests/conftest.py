"""Session-wide: one header line on whether the browser test of the explorer can run."""

from test_explorer_browser import CHROMIUM, DRIVER, MISSING


def pytest_report_header(config):
    if CHROMIUM and DRIVER:
        return f"explorer browser test: Chromium {CHROMIUM}, driver {DRIVER}"
    return f"explorer browser test: {MISSING}"
