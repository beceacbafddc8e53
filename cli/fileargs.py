"""Every file argument of every command, one path of each kind for it, and a fuzz target.

:data:`FILE_ARGUMENTS` lists each command-line argument that names a file: how the command uses
it (reads it, writes it, replaces it, writes into it as a folder), the error class its refusals
raise, and an argv that exercises it cheaply: past its argument checks the command either finishes
on small files or stops at a domain that does not exist (on libvirt's built-in ``test:///default``
driver: no daemon, no guest). :class:`Scratch` makes a path of each kind (:data:`KINDS`) in a
scratch folder; :func:`expected` says whether the argument must refuse it.

:func:`fuzz_file_argument` is the fuzz target (bytes in: which argument, which kind, the file's
content): the command must end with one of the documented exit codes (never 1, the traceback
code), refuse what it must with the argument's error class, never hang on a FIFO or a device, and
leave every file outside the one it was given as it was. ``bench/fuzz.py`` (``make fuzz``)
registers it; ``tests/test_fileargs.py`` runs it under hypothesis.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import io
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from replay_migrate import errors
from replay_migrate.errors import ImageError, ReplayMigrateError, UsageError

TEST_URI = "test:///default"
"""libvirt's in-process test driver: a domain lookup fails fast with no daemon and no guest."""
NO_DOMAIN = "rm-fuzz-no-such-domain"
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10
EXIT_CODES = frozenset({0, UsageError.exit_code} | {
    c.exit_code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, ReplayMigrateError)})
"""Every exit code the README documents except 1 (a bug: a traceback)."""


class Use(enum.Enum):
    READ = "read"
    WRITE = "write"
    REPLACE = "replace"
    FOLDER = "folder"


KINDS = ("file", "link", "fifo", "dir", "dangling", "missing", "readonly", "dev-zero", "dev-null")
"""``file``: a regular file (for a folder argument: a folder); ``link``: a symbolic link to one;
``readonly``: one in (for a new file or folder: to be made in) a folder nobody may write, root
included; ``dev-zero``/``dev-null``: the devices (for arguments that write: nodes with their numbers
made in the scratch folder, so that a bug cannot harm the real ones)."""

REFUSED: dict[Use, frozenset[str]] = {
    Use.READ: frozenset({"fifo", "dir", "dangling", "missing", "dev-zero", "dev-null"}),
    Use.WRITE: frozenset({"link", "fifo", "dir", "dangling", "readonly", "dev-zero", "dev-null"}),
    Use.REPLACE: frozenset({"link", "fifo", "dir", "dangling", "missing", "readonly", "dev-zero", "dev-null"}),
    Use.FOLDER: frozenset({"file", "fifo", "dangling", "readonly", "dev-zero", "dev-null"}),
}
"""Which kinds each use must refuse (a folder argument's ``link`` is a link to a folder)."""

REASON = {"file": "not a folder", "fifo": "FIFO", "dir": "directory", "dangling": "dangling symbolic link",
          "missing": "no such file", "link": "symbolic link", "readonly": "cannot write",
          "dev-zero": "character device", "dev-null": "character device"}
"""A phrase the refusal of each kind must contain."""

WORKLOAD = b"move 10 10\nwait 0.1\n"
FUZZ_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
"""Where the fuzz target makes its scratch folders: tmpfs halves the cost of an input (5 ms);
tmpfs takes the immutable flag too. A run killed mid-input may leave an immutable
``rm-fileargs-*/readonly`` folder behind: ``chattr -i`` it, then remove it."""


@dataclass(frozen=True)
class FileArgument:
    name: str
    use: Use
    argv: Callable[[str, Scratch], list[str]]
    """The command line with the path under test in place."""
    error: type[ReplayMigrateError] = UsageError
    """The class every refusal of this argument raises."""
    ok_code: int | None = None
    """Exit code when the path is acceptable; None: the command would go on to start guests, so
    only refusals are exercised."""
    content: bytes = b""
    """What a regular file given to this argument holds in the table's tests."""
    changes_b: bool = False
    """A success also changes the scratch's image B (``sync A``: B is made equal to A)."""


FILE_ARGUMENTS: tuple[FileArgument, ...] = (
    FileArgument("diff A", Use.READ, lambda p, s: ["diff", p, s.b], ImageError, 0, bytes(8192)),
    FileArgument("diff B", Use.READ, lambda p, s: ["diff", s.a, p], ImageError, 0, bytes(8192)),
    FileArgument("sync A", Use.READ, lambda p, s: ["sync", p, s.b], ImageError, 0, bytes(8192), changes_b=True),
    FileArgument("sync B", Use.REPLACE, lambda p, s: ["sync", s.a, p], ImageError, 0, bytes(8192)),
    FileArgument("record --out", Use.WRITE,
                 lambda p, s: ["--connect", TEST_URI, "record", NO_DOMAIN, "--out", p], ok_code=5, content=b"old"),
    FileArgument("vm screenshot OUT", Use.WRITE,
                 lambda p, s: ["--connect", TEST_URI, "vm", "screenshot", NO_DOMAIN, p], ok_code=5, content=b"old"),
    FileArgument("replay LOG", Use.READ,
                 lambda p, s: ["--connect", TEST_URI, "replay", p, "--into", NO_DOMAIN], ok_code=5),
    FileArgument("workload run", Use.READ,
                 lambda p, s: ["--connect", TEST_URI, "workload", "run", p, "--into", NO_DOMAIN], ok_code=5,
                 content=WORKLOAD),
    FileArgument("migrate --workload", Use.READ,
                 lambda p, s: ["--connect", TEST_URI, "migrate", NO_DOMAIN, "--checkpoint", "no-such-checkpoint",
                               "--workload", p], ok_code=7, content=WORKLOAD),
    FileArgument("demo --workload", Use.READ, lambda p, s: ["--connect", TEST_URI, "demo", "--workload", p,
                                                            "--out", s.folder], content=WORKLOAD),
    FileArgument("demo --out", Use.FOLDER, lambda p, s: ["--connect", TEST_URI, "demo", "--out", p]),
    FileArgument("checkpoint export --out", Use.WRITE,
                 lambda p, s: ["checkpoint", "export", "no-such-checkpoint", "--out", p], ok_code=7, content=b"old"),
    FileArgument("checkpoint import --in", Use.READ, lambda p, s: ["checkpoint", "import", "--in", p], ok_code=7),
    FileArgument("serve --tls-cert", Use.READ,
                 lambda p, s: ["serve", "--listen", "127.0.0.1:0", "--token-file", s.token, "--tls-cert", p,
                                "--tls-key", s.b],
                 ok_code=UsageError.exit_code, content=b"not a certificate"),
    FileArgument("serve --tls-key", Use.READ,
                 lambda p, s: ["serve", "--listen", "127.0.0.1:0", "--token-file", s.token, "--tls-cert", s.b,
                                "--tls-key", p],
                 ok_code=UsageError.exit_code, content=b"not a key"),
)


def expected(arg: FileArgument, kind: str) -> bool:
    """Whether ``arg`` must refuse a path of ``kind``."""
    return kind in REFUSED[arg.use]


def set_immutable(path: Path, on: bool) -> None:
    """chattr +i / -i: a folder nobody can create files in, root included (CAP_LINUX_IMMUTABLE)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0))
        flags = struct.unpack("i", buf)[0]
        flags = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
    finally:
        os.close(fd)


class Scratch:
    """A scratch folder with the other arguments' files (two raw images, a folder) and an
    ``outside`` file that links point to: no command may change it."""

    root: Path
    a: str
    b: str
    folder: str
    token: str

    def __init__(self, root: Path) -> None:
        self.root = root
        self.a = str(root / "a.raw")
        self.b = str(root / "b.raw")
        self.folder = str(root / "out")
        self.token = str(root / "token")
        self.outside = root / "outside" / "target"
        self.readonly = root / "readonly"
        self.immutable: list[Path] = []
        Path(self.a).write_bytes(b"\x01" * 8192)
        Path(self.b).write_bytes(b"\x02" * 8192)
        Path(self.token).write_text("a-token\n")
        Path(self.token).chmod(0o600)
        self.outside.parent.mkdir()
        self.readonly.mkdir()

    def make(self, arg: FileArgument, kind: str, content: bytes) -> str:
        """A path of ``kind`` for ``arg`` (its regular files hold ``content``)."""
        p = self.root / "under-test"
        folder = arg.use is Use.FOLDER
        if kind == "file":
            p.write_bytes(content)
        elif kind == "link":
            if folder:
                self.outside.mkdir(exist_ok=True)
            else:
                self.outside.write_bytes(content)
            p.symlink_to(self.outside)
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "dir":
            p.mkdir()
        elif kind == "dangling":
            p.symlink_to(self.root / "outside" / "nowhere")
        elif kind == "missing":
            pass
        elif kind == "readonly":
            p = self.readonly / "under-test"
            if arg.use in (Use.READ, Use.REPLACE):
                p.write_bytes(content)
            set_immutable(self.readonly, True)
            self.immutable.append(self.readonly)
        elif kind in ("dev-zero", "dev-null"):
            if arg.use is Use.READ:
                return f"/dev/{kind[4:]}"
            os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 5 if kind == "dev-zero" else 3))
        else:
            raise ValueError(f"unknown kind {kind!r}")
        return str(p)

    def snapshot(self) -> dict[str, bytes | None]:
        """What must not change: the link target and the other arguments' files."""
        out: dict[str, bytes | None] = {}
        for p in (self.outside, Path(self.a), Path(self.b), self.root / "outside" / "nowhere"):
            out[str(p)] = p.read_bytes() if p.is_file() else None
        return out

    def close(self) -> None:
        for p in self.immutable:
            set_immutable(p, False)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def scratch(parent: str | None = None) -> Iterator[Scratch]:
    s = Scratch(Path(tempfile.mkdtemp(prefix="rm-fileargs-", dir=parent)))
    try:
        yield s
    finally:
        s.close()


@dataclass
class Outcome:
    code: int
    err: str


def run(arg: FileArgument, path: str, s: Scratch) -> Outcome:
    """Run the command with ``path`` as ``arg`` (in this process; output captured)."""
    from cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old_state = os.environ.get("REPLAY_MIGRATE_STATE")
    os.environ["REPLAY_MIGRATE_STATE"] = str(s.root / "state")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(arg.argv(path, s))
            except SystemExit as e:      # argparse
                code = e.code if isinstance(e.code, int) else UsageError.exit_code
    finally:
        if old_state is None:
            os.environ.pop("REPLAY_MIGRATE_STATE", None)
        else:
            os.environ["REPLAY_MIGRATE_STATE"] = old_state
    return Outcome(code, err.getvalue())


def _state(path: Path) -> tuple[str, bytes | None]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ("missing", None)
    return (stat.filemode(st.st_mode), path.read_bytes() if stat.S_ISREG(st.st_mode) else None)


def check(arg: FileArgument, kind: str, content: bytes, s: Scratch) -> Outcome:
    """Run ``arg`` given a path of ``kind`` and check what every such run must satisfy: a
    documented exit code (never 1: a traceback), a refusal with the argument's error class and the
    reason when :func:`expected`, and no file changed but the one given, and that one only by a
    command that succeeded. AssertionError says which property failed."""
    path = s.make(arg, kind, content)
    watched = [s.outside, Path(s.a), Path(s.b), s.root / "outside" / "nowhere", Path(path)]
    before = {p: _state(p) for p in watched}
    o = run(arg, path, s)
    what = f"{arg.name} given {kind} ({path})"
    assert o.code in EXIT_CODES, f"{what}: exit {o.code} (a traceback?)\n{o.err}"
    assert "Traceback" not in o.err, f"{what}:\n{o.err}"
    if expected(arg, kind):
        assert o.code == arg.error.exit_code, f"{what}: exit {o.code}, not a refusal\n{o.err}"
        assert REASON[kind] in o.err, f"{what}: the refusal does not say why\n{o.err}"
    after = {p: _state(p) for p in watched}
    if o.code == 0 and arg.use is Use.REPLACE:
        after[Path(path)] = before[Path(path)]     # sync B succeeded: B was the file to change
    if o.code == 0 and arg.changes_b:
        after[Path(s.b)] = before[Path(s.b)]
    assert after == before, f"{what}: changed {[str(p) for p in watched if after[p] != before[p]]}"
    return o


def fuzz_file_argument(data: bytes) -> None:
    """Fuzz target: ``data[0]`` picks the argument, ``data[1]`` the kind, the rest is the content of
    any regular file involved. Raises AssertionError on a property violated (see :func:`check`);
    anything else escaping is a bug too."""
    if len(data) < 2:
        return
    arg = FILE_ARGUMENTS[data[0] % len(FILE_ARGUMENTS)]
    kind = KINDS[data[1] % len(KINDS)]
    if arg.ok_code is None and not expected(arg, kind):
        return                           # the command would start real work
    with scratch(FUZZ_SCRATCH) as s:
        check(arg, kind, data[2:], s)
