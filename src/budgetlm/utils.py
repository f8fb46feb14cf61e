"""Small shared helpers: atomic file writes (a reader sees the old file or the whole new one, never a part)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from budgetlm.errors import ConfigError


@contextmanager
def atomic_file(path: str | os.PathLike, aside: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path` in one rename. With
    `aside`, a file already at `path` is first moved aside (see `move_aside`), never overwritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        if aside and path.exists():
            move_aside(path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike, marker: str | None = None, aside: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; when the block succeeds it takes the place of `path` (a reader sees
    the old folder or the whole new one; a killed write leaves a hidden `.<name>.*` sibling, never a half folder).

    What already stands at `path` is replaced only when it is an empty folder or holds `marker` (budgetlm's own
    output of this kind: the two are swapped in one atomic exchange, then the old one is removed). Anything else is
    moved aside with `aside` (see `move_aside`) and otherwise refused: this never deletes what budgetlm did not
    write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
        elif path.exists() or path.is_symlink():
            ours = marker is not None and path.is_dir() and (path / marker).exists()
            if ours:
                _exchange(tmp, path)  # tmp now holds the old output
                shutil.rmtree(tmp, ignore_errors=True)
                return
            if not aside:
                raise ConfigError(f"{path} appeared while budgetlm worked and budgetlm did not write it; not replaced")
            move_aside(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); where the call is missing, two renames."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        fn = None
    if fn is not None:
        at_fdcwd, rename_exchange = -100, 2
        if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    hold = Path(tempfile.mkdtemp(prefix=f".{b.name}.old.", dir=b.parent))
    os.replace(b, hold / "x")
    os.replace(a, b)
    os.replace(hold / "x", a)
    hold.rmdir()


def move_aside(path: str | os.PathLike) -> Path:
    """Rename `path` to `<path>.old-<time>` (with -2, -3... if taken) beside it and return the new name: what a
    user had there is kept, never deleted."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.old-{stamp}")
    n = 2
    while target.exists() or target.is_symlink():
        target = path.with_name(f"{path.name}.old-{stamp}-{n}")
        n += 1
    os.rename(path, target)
    print(f"note: moved the existing {path} aside to {target}", file=sys.stderr)
    return target


def _probe_writable(folder: Path, where: str, flag: str) -> None:
    """Create and remove an empty folder in `folder`: the one test of writability that also holds for root, read-only
    mounts and virtual file systems (os.access says yes to root everywhere)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".budgetlm-probe-", dir=folder))
    except OSError as exc:
        problem = f"{folder} is not writable ({exc.strerror})"
        raise ConfigError(f"cannot write {where}: {problem}; choose another {flag}") from None


def check_output(
    path: str | os.PathLike,
    what: str,
    *,
    marker: str | Callable[[Path], bool],
    force: bool = False,
    folder: bool = True,
    resume: bool = False,
    flag: str = "--out",
) -> bool:
    """Before any work: may `what` (e.g. "a compressed model") be written to `path`? Returns True when `path` holds
    budgetlm's own output of this kind (`marker`: a file name inside the folder, or a test of the file) that the
    caller resumes or, with `force`, replaces; False when `path` is new or an empty folder, or (with `force`) holds
    something else that the write will move aside. Everything else is a one-line ConfigError: the current folder
    or one holding it, a file where a folder is wanted (or the reverse), an unwritable place, and any existing output
    budgetlm did not write (never touched without `force`, and then only moved aside)."""
    path = Path(path).expanduser()
    where = f"{flag} {path}"
    full = path.resolve()
    cwd = Path.cwd().resolve()
    if full == cwd or full in cwd.parents or full == Path.home().resolve():
        raise ConfigError(f"{where} is the current folder or holds it; give a new folder, e.g. {flag} out/NAME")
    kind = "folder" if folder else "file"
    if not path.exists() and not path.is_symlink():
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"cannot create {where}: {parent} is a file, not a folder; choose another {flag}")
        _probe_writable(parent, where, flag)
        return False
    _probe_writable(path.parent, where, flag)  # the write goes to a sibling first, then takes the name
    if folder and not path.is_dir():
        raise ConfigError(f"{where} is an existing file; give a folder (a new or empty one)")
    if not folder and path.is_dir():
        raise ConfigError(f"{where} is a folder; give the {kind} to write")
    if folder and not any(path.iterdir()):
        return False
    ours = marker(path) if callable(marker) else (path / marker).exists()
    if ours and (resume or force):
        return True
    if ours:
        raise ConfigError(f"{where} already holds {what} from an earlier run; pass --force to replace it")
    if force:
        return False
    held = "holds files" if folder else "exists and"
    raise ConfigError(
        f"{where} {held} budgetlm did not write; choose another {flag}, or pass --force to move it aside (kept as "
        f"{path.name}.old-<time>)"
    )


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def atomic_write_jsonl(path: str | os.PathLike, records: list[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in records))


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers: `2:4` (an N:M sparsity pattern) stays the string
    "2:4" instead of becoming the integer 124, and `1:30` is not 90. Everything else resolves as SafeLoader does."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def yaml_load(text: str):
    """Parse YAML text with YamlLoader (safe, no base-60 numbers)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass
