"""Writing files so that a reader never sees half of one, and reading results files that may be damaged.

Every results and state file gptlab writes (result.json, metrics.jsonl after a resume,
results.jsonl, sweep state, tokenizer files, caches) goes through `write_atomic`: the
bytes go to a temporary file in the same folder, which is renamed over the target
only once complete. A kill or a full disk at any point leaves the old file or the new
one, never a cut one, and no temporary file behind (it is removed when the write fails).

Every reader of a results file of JSON lines (a sweep's and a study's results.jsonl) goes
through `read_jsonl`, which refuses a damaged line in one line naming the file and the line
(never skips it: a table that silently lost a row is the failure these files exist to prevent).
"""
import json
import os
import pathlib
import uuid

from gptlab.errors import UserError


def write_atomic(path, data, fsync: bool = False) -> None:
    """Replaces `path` with `data` (str: UTF-8 text; bytes as they are) in one rename.

    Raises OSError (e.g. ENOSPC) with the target untouched and no temporary file left.
    `fsync`: flush to the disk before the rename (for files that must survive a power cut,
    not only a killed process).
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        e.filename = str(path)  # the file the caller meant to write, not its temporary
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path, obj, indent=2, default=None) -> None:
    """`write_atomic` of `obj` as JSON with a final newline."""
    write_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")


def write_jsonl_atomic(path, records, default=None) -> None:
    """`write_atomic` of one JSON line per record."""
    write_atomic(path, "".join(json.dumps(r, default=default) + "\n" for r in records))


def read_json(path, fix: str):
    """The JSON in `path`, or None where there is no such file; a damaged file raises UserError naming it,
    with `fix` (what the user should do)."""
    path = pathlib.Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is damaged (not JSON: {e}): {fix}") from None


def read_jsonl(path, fix: str) -> list:
    """The records of a JSON-lines results file ([] when it does not exist; blank lines ignored).

    A line that is not a JSON object raises UserError naming `path` and the line's number, with `fix`:
    how to regenerate the file.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path} line {number} is damaged (not JSON: {e}): {fix}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number} is damaged (a JSON {type(record).__name__}, not a record): {fix}")
        records.append(record)
    return records
