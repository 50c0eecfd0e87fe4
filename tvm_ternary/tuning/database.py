"""Tuning databases: one MetaSchedule JSON database per CPU under a user's ``DIR``.

Layout::

    DIR/<mcpu>-<sha256 of the sorted LLVM feature list, 12 hex>/
        tvm_ternary_db.json            # format, TVM version, mcpu, features (written once)
        database_workload.json         # MetaSchedule's: one line per workload
        database_tuning_record.json    # MetaSchedule's: one line per measured candidate

so one DIR serves several CPUs (and a CPU with features switched off gets its own folder).
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


def cpu_key(target) -> str:
    """``<mcpu>-<12 hex>``: the folder name of ``target``'s records."""
    feats = ",".join(sorted(ta.target_features(target)))
    return f"{ta.target_mcpu(target)}-{hashlib.sha256(feats.encode()).hexdigest()[:12]}"


def _meta(target) -> dict:
    return {"format": FORMAT, "tvm_version": ta.tvm_version(), "mcpu": ta.target_mcpu(target),
            "features": sorted(ta.target_features(target))}


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


def open_database(root, *, target, create: bool) -> TuningDatabase:
    """The database of ``target`` under ``root``.

    ``create=True`` (tune): make the folder when missing, check it can be written.
    ``create=False`` (compile): the folder must exist; nothing is written.
    """
    root = Path(root)
    folder = root / cpu_key(target)
    mcpu, feats = ta.target_mcpu(target), tuple(sorted(ta.target_features(target)))
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
        return TuningDatabase(folder, mcpu, feats, _load(folder, create=False))
    if folder.exists():
        _check_meta(folder, target)
        present = [(folder / name).is_file() for name in DB_FILES]
        if any(present) and not all(present):
            raise TuningDatabaseError(f"{folder}: one of {', '.join(DB_FILES)} is missing; left untouched")
        _ensure_writable(folder)
        return TuningDatabase(folder, mcpu, feats, _load(folder, create=True))
    try:
        folder.mkdir(parents=True)
        tmp = folder / f".{META_FILE}.tmp"
        tmp.write_text(json.dumps(_meta(target), indent=1))
        os.replace(tmp, folder / META_FILE)
    except OSError as error:
        raise TuningDatabaseError(f"{folder}: cannot create the tuning database ({error.strerror or error})") from None
    return TuningDatabase(folder, mcpu, feats, _load(folder, create=True))
