"""The fuzz targets: every decoder that takes bytes from a peer or a file (see ``bench.fuzz``).

Each target is a plain function ``input bytes -> None`` that may raise only project errors, and a
generator that builds a structurally valid input and mutates it where it matters: a log or channel
stream with valid CRCs, protocol message sequences recorded from real transfers (with compressed
batch bodies re-compressed after their content was mutated, or replaced by frames that lie about
their size), synthetic save images with every header and section field known, tree and leaf-digest
files. Some targets also check an invariant on what they accept (a verified transfer wrote the
source's bytes; decoded event times never go back), so an acceptance that should not happen is a
failure too.

**Registering a target** is one line in :func:`targets`. For a decoder whose module defines a
target function and a few valid inputs to mutate (or its own generator), without an import::

    external("session", "tests.sessionkit:fuzz_session_message", seeds="tests.sessionkit:FUZZ_SEEDS"),
    external("cli-files", "cli.main:fuzz_file_argument", generate="cli.main:fuzz_generate"),
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Sequence
from typing import Any

from bench.fuzz import DEFAULT_RSS_BOUND_MIB, FuzzTarget, check_input, mutating
from bench.fuzz_targets.files import (
    generate_leaf_digests,
    generate_save_header,
    generate_save_image,
    generate_tree_file,
    run_leaf_digests,
    run_save_header,
    run_save_image,
    run_tree_file,
)
from bench.fuzz_targets.protocol import (
    generate_protocol_source,
    generate_protocol_target,
    run_protocol_source,
    run_protocol_target,
)
from bench.fuzz_targets.recorder import (
    generate_channel_agent,
    generate_channel_host,
    generate_log,
    run_channel_agent,
    run_channel_host,
    run_log,
)

# -- targets defined elsewhere ----------------------------------------------------------------------------


def _resolve(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def external(name: str, run: str, *, seeds: str | None = None, generate: str | None = None, what: str = "",
             rss_bound_mib: int = DEFAULT_RSS_BOUND_MIB) -> FuzzTarget:
    """A target whose function lives in another module, named ``"module:attribute"`` and imported
    when first used: ``run`` the target function (bytes -> None), ``generate`` a generator
    (Random -> bytes) or ``seeds`` a sequence of valid inputs that :func:`bench.fuzz.mutating`
    mutates (else random bytes)."""

    def run_it(data: bytes) -> None:
        _resolve(run)(data)

    def generate_it(rng: random.Random) -> bytes:
        if generate is not None:
            return bytes(_resolve(generate)(rng))
        if seeds is not None:
            return mutating(list(_resolve(seeds)))(rng)
        return rng.randbytes(rng.randrange(512))

    return FuzzTarget(name, run_it, generate_it, rss_bound_mib=rss_bound_mib, what=what or run)


# -- the registry ---------------------------------------------------------------------------------------


def targets() -> list[FuzzTarget]:
    """Every registered target; add one with one line (see the module docstring)."""
    return [
        FuzzTarget("log", run_log, generate_log, what="recorder.logformat: whole and incremental log decoding"),
        FuzzTarget("channel-host", run_channel_host, generate_channel_host,
                   what="recorder.channel: the host reading an agent's stream"),
        FuzzTarget("channel-agent", run_channel_agent, generate_channel_agent,
                   what="recorder.channel: the agent reading a host's stream (never raises)"),
        FuzzTarget("protocol-target", run_protocol_target, generate_protocol_target,
                   what="differ.protocol: a target fed a source's messages"),
        FuzzTarget("protocol-source", run_protocol_source, generate_protocol_source,
                   what="differ.protocol: a source fed a target's messages"),
        FuzzTarget("save-image", run_save_image, generate_save_image,
                   what="differ.saveimage, MemoryImageSource, replay_migrate.savefmt: a sparse save image"),
        FuzzTarget("save-header", run_save_header, generate_save_header,
                   what="replay_migrate.savefmt: the libvirt header read and rewritten in place"),
        FuzzTarget("tree-file", run_tree_file, generate_tree_file, what="differ.merkle: a saved tree file"),
        FuzzTarget("leaf-digests", run_leaf_digests, generate_leaf_digests,
                   what="differ.blocks.LeafDigests: a saved leaf-digest file"),
        external("session", "tests.sessionkit:fuzz_session_message", seeds="tests.sessionkit:FUZZ_SEEDS",
                 what="server.wire / link / session / clientcore: service and client fed a peer's message"),
        external("checkpoint-stream", "tests.test_ckstream:fuzz_stream", generate="tests.test_ckstream:fuzz_generate",
                 what="store.ckstream: a checkpoint import stream (`checkpoint import`)"),
        external("cli-files", "cli.fileargs:fuzz_file_argument",
                 what="cli.fileargs: every file argument of every command given odd files"),
    ]


def targets_by_name(extra: Sequence[FuzzTarget] = ()) -> dict[str, FuzzTarget]:
    return {t.name: t for t in [*targets(), *extra]}


def fuzz_one(name: str, source: random.Random | bytes) -> bool:
    """For the unit tests: run target ``name`` on an input generated from ``source`` (a Random, which
    hypothesis drives) or on ``source`` itself (bytes). True if accepted, False if refused with a
    project error; anything else propagates."""
    target = targets_by_name()[name]
    return check_input(target, source if isinstance(source, bytes) else target.generate(source))
