"""Tuning databases: one MetaSchedule JSON database per CPU under a user's ``DIR``.

Layout::

    DIR/<mcpu>-<sha256 of the sorted LLVM feature list, 12 hex>/
        tvm_ternary_db.json            # format, TVM version, mcpu, features (written once)
        database_workload.json         # MetaSchedule's: one line per workload
        database_tuning_record.json    # MetaSchedule's: one line per measured candidate

so one DIR serves several CPUs (and a CPU with features switched off gets its own folder).

One writer at a time: a tune holds an exclusive ``fcntl.flock`` on ``.lock`` in the folder
for as long as it runs (a second tune into the same folder waits for it, then reads what the
first wrote: two writers would interleave the workload file and attach records to the wrong
kernels); ``compile --tuning-db`` takes a shared lock and refuses while a tune writes. A last
line cut short (a tune killed mid-write: no trailing newline, not JSON) is dropped, the rest
kept, and said so; any other damage is refused.
MetaSchedule appends one line per record as soon as a batch is measured: an interrupted tune
keeps everything measured before its last batch.  A folder whose files do not load, or that
another TVM version wrote, is reported (:class:`TuningDatabaseError`) and never written to.

Example::

    tdb = open_database("tuning-db", target=target, create=True)   # tune
    tdb = open_database("tuning-db", target=target, create=False)  # compile --tuning-db
    tdb.db                                                         # the JSONDatabase
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import tvm_adapter as ta
from ..errors import UserError

META_FILE = "tvm_ternary_db.json"
DB_FILES = ("database_workload.json", "database_tuning_record.json")
FORMAT = 1


class TuningDatabaseError(UserError):
    """The tuning database is missing, unreadable, corrupt, from another TVM, or not writable."""


@dataclass(frozen=True, eq=False)
class TuningDatabase:
    path: Path  # the per-CPU folder
    mcpu: str
    features: tuple[str, ...]
    db: object  # MetaSchedule JSONDatabase
    notes: tuple[str, ...] = ()  # what opening did (a cut last line dropped)
    lock: object = None  # the open lock file: the flock lasts as long as it is open

    def close(self) -> None:
        """Release the lock (the records stay readable in ``db``; write no more)."""
        if self.lock is not None:
            self.lock.close()


LOCK_FILE = ".lock"


def _lock(folder: Path, *, exclusive: bool, log):
    """Hold ``folder``'s lock: exclusive (a tune; waits for another tune) or shared (a compile;
    refuses while a tune writes). Returns the open file that holds it."""
    import fcntl

    try:
        f = open(folder / LOCK_FILE, "a+")
    except OSError as error:
        if not exclusive:  # a read-only copy of a database: nobody can be writing it
            return None
        raise TuningDatabaseError(f"{folder}: cannot open its lock file ({error.strerror or error})") from None
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        if not exclusive:
            f.close()
            raise TuningDatabaseError(f"{folder}: a tune (pid {holder}) is writing this database; compile "
                                      "when it has finished") from None
        log(f"waiting for the tune (pid {holder}) writing {folder} to finish (Ctrl-C to give up)", flush=True)
        fcntl.flock(f, mode)
    if exclusive:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
    return f


def _cut_last_line(path: Path) -> int:
    """Bytes of a cut last line of ``path`` (no newline and not JSON), 0 when it has none."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    last = data[data.rfind(b"\n") + 1 :]
    try:
        json.loads(last)
        return 0
    except ValueError:
        return len(last)


def _repair(folder: Path, *, write: bool) -> tuple[list[str], Path]:
    """Drop cut last lines (in place when ``write``, else in a temporary copy that is then
    the folder to load); returns the notes and the folder to load from."""
    cuts = {name: _cut_last_line(folder / name) for name in DB_FILES}
    cuts = {name: n for name, n in cuts.items() if n}
    if not cuts:
        return [], folder
    load_from = folder
    if not write:
        import shutil
        import tempfile

        load_from = Path(tempfile.mkdtemp(prefix="tvm_ternary_db_"))
        for name in DB_FILES:
            shutil.copy(folder / name, load_from / name)
    notes = []
    for name, n in cuts.items():
        path = load_from / name
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - n)
        notes.append(f"{folder / name}: dropped a cut last line ({n} bytes; a tune killed while writing)"
                     + ("" if write else " from the records read; the file is left as it is"))
    return notes, load_from


def cpu_key(target) -> str:
    """``<mcpu>-<12 hex>``: the folder name of ``target``'s records."""
    from ..cpu_features import TUNING_KEY_FEATURES

    feats = ",".join(sorted(f for f in ta.target_features(target) if f in TUNING_KEY_FEATURES))
    return f"{ta.target_mcpu(target)}-{hashlib.sha256(feats.encode()).hexdigest()[:12]}"


def _meta(target) -> dict:
    from ..cpu_features import TUNING_KEY_FEATURES

    return {"format": FORMAT, "tvm_version": ta.tvm_version(), "mcpu": ta.target_mcpu(target),
            "features": sorted(f for f in ta.target_features(target) if f in TUNING_KEY_FEATURES)}


def _check_meta(folder: Path, target) -> None:
    try:
        meta = json.loads((folder / META_FILE).read_text())
        version, fmt = meta["tvm_version"], meta["format"]
    except FileNotFoundError:
        raise TuningDatabaseError(f"{folder}: not a tvm-ternary tuning database ({META_FILE} missing); "
                                  "left untouched") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TuningDatabaseError(f"{folder}/{META_FILE}: unreadable ({error}); left untouched") from None
    if fmt != FORMAT or version != ta.tvm_version():
        raise TuningDatabaseError(
            f"{folder}: written by TVM {version} (format {fmt}), this is TVM {ta.tvm_version()} "
            f"(format {FORMAT}); records are not portable across TVM versions. Left untouched: "
            "tune into another DIR")
    if meta.get("features") != _meta(target)["features"]:
        raise TuningDatabaseError(f"{folder}: records for features {meta.get('features')}, not this target's")


def _load(folder: Path, *, create: bool):
    from .. import tvm_tuning_adapter as tta
    from ..schedules.intrin import BLOCKS, intrin_name

    for isa in BLOCKS:  # loading replays every trace: their tensorize needs our intrinsics
        intrin_name(isa)

    try:
        return tta.open_database(str(folder), create=create)
    except Exception as error:  # pylint: disable=broad-except  # TVM raises its own error types
        first = " ".join(str(error).split())[:240]
        raise TuningDatabaseError(f"{folder}: corrupt tuning database ({first}); left untouched") from None


def _ensure_writable(folder: Path) -> None:
    # Try it rather than ask os.access (which says yes to root on a read-only mount): append
    # mode opens without changing a byte; the probe file is removed again.
    try:
        for name in DB_FILES:
            if (folder / name).exists():
                with open(folder / name, "a"):
                    pass
        probe = folder / ".write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise TuningDatabaseError(f"{folder}: not writable ({error.strerror or error})") from None


def open_database(root, *, target, create: bool, log=print) -> TuningDatabase:
    """The database of ``target`` under ``root``.

    ``create=True`` (tune): make the folder when missing, check it can be written, hold its
    lock (exclusive: waits for another tune) for as long as the returned database lives.
    ``create=False`` (compile): the folder must exist; a shared lock while it is read; nothing
    is written.
    """
    root = Path(root)
    folder = root / cpu_key(target)
    mcpu, feats = ta.target_mcpu(target), tuple(_meta(target)["features"])
    if root.exists() and not root.is_dir():
        raise TuningDatabaseError(f"{root}: not a directory")
    if not create:
        if not folder.is_dir():
            have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise TuningDatabaseError(f"{root}: no tuning records for {mcpu} (looked for {folder.name}; "
                                      f"has {', '.join(have) or 'nothing'}); tune first or drop --tuning-db")
        _check_meta(folder, target)
        if not all((folder / name).is_file() for name in DB_FILES):
            raise TuningDatabaseError(f"{folder}: database files missing; left untouched")
        lock = _lock(folder, exclusive=False, log=log)
        try:
            notes, load_from = _repair(folder, write=False)
            db = _load(load_from, create=False)
        finally:
            if lock is not None:  # read into memory: the files are not needed any more
                lock.close()
        return TuningDatabase(folder, mcpu, feats, db, notes=tuple(notes))
    # checks that write nothing first (a folder that is not ours is left untouched); a folder
    # with only a lock in it is one another tune is making right now: wait for it below
    existed = folder.exists()
    if existed and (folder / META_FILE).exists():
        _check_meta(folder, target)
        present = [(folder / name).is_file() for name in DB_FILES]
        if any(present) and not all(present):
            raise TuningDatabaseError(f"{folder}: one of {', '.join(DB_FILES)} is missing; left untouched")
        _ensure_writable(folder)
    elif existed and any(p.name not in (LOCK_FILE, f".{META_FILE}.tmp") for p in folder.iterdir()):
        _check_meta(folder, target)  # raises: not a tvm-ternary tuning database
    else:
        try:
            folder.mkdir(parents=True, exist_ok=True)  # another tune may be making it too
        except OSError as error:
            raise TuningDatabaseError(f"{folder}: cannot create the tuning database "
                                      f"({error.strerror or error})") from None
    lock = _lock(folder, exclusive=True, log=log)
    try:
        if (folder / META_FILE).exists():
            _check_meta(folder, target)  # again: another tune may have made it while we waited
        else:
            tmp = folder / f".{META_FILE}.tmp"
            tmp.write_text(json.dumps(_meta(target), indent=1))
            os.replace(tmp, folder / META_FILE)
        notes, _ = _repair(folder, write=True)
        return TuningDatabase(folder, mcpu, feats, _load(folder, create=True), notes=tuple(notes), lock=lock)
    except OSError as error:
        lock.close()
        raise TuningDatabaseError(f"{folder}: cannot write the tuning database ({error.strerror or error})") from None
    except BaseException:
        lock.close()
        raise
