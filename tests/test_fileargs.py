"""Every file argument of every command given every kind of path: a FIFO, a directory, a link, a
dangling link, a read-only folder, /dev/zero and /dev/null, a missing file. Each must be refused
with the argument's error class and a reason, or accepted, at once (no FIFO or device may make a
command wait), with no traceback and no file changed but the one given.

The commands run in this process against libvirt's built-in test driver (``test:///default``): no
daemon and no guest, so a domain lookup fails fast once the file arguments passed their checks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.fileargs import FILE_ARGUMENTS, KINDS, FileArgument, check, expected, fuzz_file_argument, scratch

pytestmark = pytest.mark.timeout(20)

CASES = [(a, k) for a, k in itertools.product(FILE_ARGUMENTS, KINDS) if expected(a, k) or a.ok_code is not None]


@pytest.mark.parametrize(("arg", "kind"), CASES, ids=[f"{a.name}-{k}" for a, k in CASES])
def test_file_argument(arg: FileArgument, kind: str) -> None:
    with scratch() as s:
        o = check(arg, kind, arg.content, s)
        if not expected(arg, kind):
            assert o.code == arg.ok_code, f"{arg.name} given {kind}: exit {o.code}\n{o.err}"


def test_every_command_with_a_file_argument_is_in_the_table() -> None:
    names = {a.name.split()[0] for a in FILE_ARGUMENTS}
    assert {"diff", "sync", "record", "vm", "replay", "workload", "migrate", "demo", "serve"} <= names


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=2, max_size=4096))
def test_fuzz_file_argument(data: bytes) -> None:
    fuzz_file_argument(data)
