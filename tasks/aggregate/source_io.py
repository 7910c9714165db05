"""Safe reads for the aggregation sources: confined paths, regular files only, bounded sizes, checked text.

Every reader in tasks/aggregate/sources.py goes through these helpers, so the rules hold for all formats at once:
- a path named by the data (a manifest line, a Parquet image struct) resolves inside the source's root unless the
  source opts out (`allow_outside_root`); symlinks are resolved before the check;
- only regular files are opened, never FIFOs or devices (a FIFO would block, /dev/zero would never end), and the
  open itself cannot block (O_NONBLOCK);
- a read stops at a size cap; a manifest line over its cap is skipped in bounded pieces;
- text is checked to be UTF-8 (no lone surrogates) before it reaches a table.
A bad value raises `Rejected(reason, detail)`, which the reader turns into a quarantine row for that one record.
Leaves out: image decoding (tasks/aggregate/curate.py). The root check and the open are two steps: a symlink swapped in
between them by someone else is not caught (the source's files are assumed not to change while it is read).
"""
import glob
import os
import re
import stat
from collections.abc import Iterator
from typing import BinaryIO

_IO_REPR = re.compile(r"<_io\.\w+ (object|name=[^>]*) at 0x[0-9a-f]+>|<_io\.\w+ name=[^>]*>")
_GLOB_CHARS = re.compile(r"[*?\[]")
MESSAGE_CHARS = 400  # longest detail kept in a quarantine row


class Rejected(Exception):
    """One record cannot be used; `reason` is the quarantine reason, `detail` names the value and the fix."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, clean(detail)


def clean(text: object, limit: int = MESSAGE_CHARS) -> str:
    """Message text safe for a table: valid UTF-8 (bad code points escaped), no `<_io.BytesIO at 0x…>`, bounded."""
    s = _IO_REPR.sub("<bytes>", str(text)).encode("utf-8", "backslashreplace").decode("utf-8")
    return s if len(s) <= limit else s[:limit - 15] + f"… ({len(s)} chars)"


def check_text(value: object, what: str) -> str | None:
    """A text field as str: None stays None, bytes must be UTF-8, str must hold no lone surrogate; BOM dropped."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Rejected("bad_text", f"{what} is not UTF-8 (byte {e.start}: {bytes(value)[e.start:e.start + 4]!r}); "
                                       f"store text as UTF-8") from None
    if not isinstance(value, str):
        raise Rejected("bad_field", f"{what} must be text, got {type(value).__name__} {clean(repr(value), 60)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Rejected("bad_text", f"{what} holds a lone surrogate U+{ord(value[e.start]):04X} at character "
                                   f"{e.start}; it cannot be stored as UTF-8") from None
    return value.removeprefix("\ufeff")


def inside(path: str, root: str) -> bool:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def resolve_in_root(name: object, base: str, root: str, what: str, allow_outside: bool) -> str:
    """The real path of `name` (relative to `base`), refused when it leaves `root` and the source did not opt in."""
    if not isinstance(name, str):
        raise Rejected("bad_field", f"{what} must be a path string, got {type(name).__name__} "
                                    f"{clean(repr(name), 60)}")
    if not name:
        raise Rejected("bad_field", f"{what} is an empty path; leave it out (or null) for a generation sample")
    check_text(name, what)
    if "\x00" in name:
        raise Rejected("bad_field", f"{what} {clean(repr(name), 80)} holds a NUL byte")
    real = os.path.realpath(os.path.join(base, name))
    if not allow_outside and not inside(real, root):
        raise Rejected("outside_root", f"{what} {clean(name, 120)} resolves to {clean(real, 120)}, outside the "
                                       f"source root {clean(root, 120)}; move it under the root or set "
                                       f"allow_outside_root: true on this source")
    return real


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def open_regular(path: str, what: str) -> BinaryIO:
    """Opens a regular file for binary reading; FIFOs, devices and directories are refused without blocking."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise Rejected("not_a_regular_file", f"{what} {clean(path, 160)} is a {_kind(st.st_mode)}; "
                                                 f"only regular files are read")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Rejected("missing_file", f"{what} {clean(path, 160)}: no such file") from None
    except OSError as e:
        raise Rejected("unreadable_file", f"{what} {clean(path, 160)}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced between stat and open
        os.close(fd)
        raise Rejected("not_a_regular_file", f"{what} {clean(path, 160)} is a {_kind(st.st_mode)}")
    return os.fdopen(fd, "rb")


def read_capped(path: str, what: str, limit: int) -> bytes:
    """All bytes of a regular file of at most `limit` bytes."""
    with open_regular(path, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise Rejected("file_too_large", f"{what} {clean(path, 160)} is over {limit} bytes (max_file_bytes); "
                                         f"raise max_file_bytes on this source to accept it")
    return data


def iter_lines(f: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) per line, reading at most limit + 1 bytes at once; None for a line over `limit`."""
    lineno = 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest of the long line, piece by piece
                line = f.readline(limit + 1)
            yield lineno, None
        else:
            yield lineno, line


def source_files(path: str, suffix: str) -> tuple[str, list[tuple[str, str]]]:
    """(root, [(name relative to root, path)]) of a parquet / webdataset source: a folder (walked without following
    symlinked folders), a glob (root: the folder before the first wildcard) or one named file (root: the folder it
    really lives in, so a named symlink is trusted). Raises when nothing matches."""
    if os.path.isdir(path):
        root, files = path, []
        for folder, dirs, names in os.walk(path):
            dirs.sort()
            files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(suffix)]
    elif _GLOB_CHARS.search(path):
        root = os.path.dirname(_GLOB_CHARS.split(path, 1)[0]) or "."
        files = sorted(glob.glob(path, recursive=True))
    elif os.path.lexists(path):
        return os.path.dirname(os.path.realpath(path)), [(os.path.basename(path), path)]
    else:
        files = []
    if not files:
        raise FileNotFoundError(f"no {suffix} files match {path!r}; give a folder, a glob or a file")
    return root, [(os.path.relpath(f, root), f) for f in files]
