"""Fixtures for the tests on real servers (tests/real), built by beds/*/bed.sh.

pytest puts this directory on sys.path (rootdir-relative "prepend" import mode), so the bed
helpers import as top-level modules.
"""

from __future__ import annotations

import subprocess

import pytest
from dogtag_bed import BUILD_HINT, BedError, DogtagBed

# ---- the real-Dogtag bed (beds/dogtag/bed.sh) ---------------------------------------------------


@pytest.fixture
def dogtag_bed() -> DogtagBed:
    """The real Dogtag master + clone bed, with both DS and both CAs running (started if stopped).

    Fails (never skips) when the bed is not built or does not come up: a test marked ``real``
    that cannot run is a failure to fix.
    """
    bed = DogtagBed()
    if not bed.is_built():
        pytest.fail(f"no real-Dogtag bed at {bed.root} (DOGTAG_ROOT); {BUILD_HINT}", pytrace=False)
    try:
        bed.ensure_running()
    except (BedError, OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"the real-Dogtag bed at {bed.root} is not usable: {exc}\n{BUILD_HINT}", pytrace=False)
    return bed


# ---- the real-systemd bed (beds/systemd/bed.sh) -------------------------------------------------
# session-scoped: built if needed, booted and installed once, powered off at the end (systemd_bed.py)
from systemd_bed import systemd_bed  # noqa: E402, F401
