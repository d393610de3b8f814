"""Shared setup of agentenv's E2B SDK suite (see tests/e2b/README.md).

The suite drives a running agentenv daemon through the official `e2b` SDK
exactly as a user would: the three environment variables below, nothing
else. `tests/e2b/run.sh` starts the daemon and sets them; run by hand, they
must be set, or the whole session fails (it never skips).

Cases an SDK version cannot express (a method or parameter that version
lacks) carry `@sdk_at_least("X.Y.Z", why)`: for older SDKs they are
*deselected* — not run, and reported as "not run for e2b <v>", never
counted as passed or skipped. Their docstrings say which versions lack what.
"""

import importlib.metadata
import os
import time
import uuid

import pytest
from packaging.version import Version

SDK_VERSION = Version(importlib.metadata.version("e2b"))

REQUIRED_ENV = ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY")

# One id per pytest session: every sandbox this session creates carries it in
# its metadata, so list filters see only this session's sandboxes even when
# another run (the other SDK version) shares the daemon.
RUN_ID = os.environ.get("E2B_SUITE_RUN_ID") or uuid.uuid4().hex[:12]

# How long a sandbox of the suite may live (seconds): long enough for a
# module under TCG, short enough that a crashed run cleans itself up.
SANDBOX_TIMEOUT = int(os.environ.get("E2B_SUITE_SANDBOX_TIMEOUT", "900"))


def sdk_at_least(version, why):
    """Marks a case that needs SDK `version` or newer (`why`: what older lacks)."""
    return pytest.mark.sdk_at_least(version, why)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "sdk_at_least(version, why): needs e2b >= version; deselected below it"
    )
    missing = [k for k in REQUIRED_ENV if not os.environ.get(k)]
    if missing:
        raise pytest.UsageError(
            "the E2B SDK suite needs a running agentenv E2B listener: set "
            + ", ".join(missing)
            + " (tests/e2b/run.sh does it all)"
        )


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        m = item.get_closest_marker("sdk_at_least")
        if m is not None and SDK_VERSION < Version(m.args[0]):
            drop.append((item, m))
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=[i for i, _ in drop])
        items[:] = keep
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        lines = [
            f"not run for e2b {SDK_VERSION}: {i.nodeid} (needs e2b >= {m.args[0]}: {m.args[1]})"
            for i, m in drop
        ]
        config._e2b_not_run = lines  # printed in the summary
        if reporter is not None:
            for line in lines:
                reporter.write_line(line)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = getattr(config, "_e2b_not_run", [])
    terminalreporter.write_sep("-", f"e2b SDK {SDK_VERSION}: {len(lines)} cases not run for this version")
    for line in lines:
        terminalreporter.write_line(line)


def metadata(**extra):
    """Metadata tagging a sandbox as this session's."""
    return {"suite": RUN_ID, "sdk": str(SDK_VERSION), **extra}


def wait_until(what, cond, timeout=30.0, every=0.2):
    """Polls `cond()` until it is truthy (returns it) or fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def sbx(request):
    """One sandbox shared by a module's sync cases (they leave it as they found it)."""
    from e2b import Sandbox

    s = Sandbox.create(
        timeout=SANDBOX_TIMEOUT,
        metadata=metadata(module=request.module.__name__),
        envs={"SUITE_VAR": "from-create", "SUITE_SHARED": "sandbox"},
    )
    yield s
    s.kill()


@pytest.fixture
def tmpdir_in_sbx(sbx, request):
    """A fresh directory in the shared sandbox, under /home/user, removed afterwards."""
    d = f"/home/user/t-{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"
    sbx.files.make_dir(d)
    yield d
    sbx.files.remove(d)
