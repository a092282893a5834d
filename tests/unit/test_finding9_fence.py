"""Issue 10, finding 9: fence_command gets `--` before the member name; its output (a fence agent's
`-P password`) stays out of the exception that reaches history, errors and the API."""

from __future__ import annotations

import logging

import pytest

from ca_watchdog.node import NodeError, run_fence_command

SCRIPT = 'echo "argv: $*"; echo "fence_ipmilan -a 10.0.0.9 -l admin -P hunter2 password=s3cret"; exit 3'


async def test_finding9_fence_command_output_stays_in_the_journal_redacted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ca_watchdog.node")
    with pytest.raises(NodeError) as err:
        await run_fence_command(["sh", "-c", SCRIPT, "fence"], "ca1", 10)
    assert str(err.value) == "fence_command failed for ca1 (exit status 3; its output is in the journal)"
    logged = caplog.text
    assert "argv: -- ca1" in logged  # "--" before the member name
    assert "hunter2" not in logged and "s3cret" not in logged
    assert "-P ***" in logged and "password=***" in logged


async def test_finding9_a_member_name_cannot_become_an_option() -> None:
    # "--" ends the options of any getopt-style fence agent: the name is an operand
    await run_fence_command(["sh", "-c", 'test "$1" = "--" && test "$2" = "-x"', "fence"], "-x", 10)
