"""Vendored files under a manifest: copy, update what the user has not edited, report (with a diff) what they have.

``<repo>/curry_train/MANIFEST.json`` records the curry-train version that wrote the files and the sha256 of each
file *as it was written* (paths relative to the repository root). On every later ``add`` / ``scaffold --update``,
for each file the new version would write:

=====================================  ==============================================================
what is on disk                        what happens
=====================================  ==============================================================
nothing                                ``new``: written
the new content already                ``unchanged``
the recorded content (not edited)      ``updated``: replaced
anything else (edited, or not ours)    ``kept``: left alone, reported with a unified diff of what the new
                                       version would change; ``--force``: ``overwritten`` after a copy
                                       to ``<file>.orig``
=====================================  ==============================================================

A file the manifest lists that the new version no longer has is ``removed`` when unedited, else ``kept``.
Writes are atomic: every new file is first written into a temporary folder inside the repository, then moved
into place with ``os.replace`` (one rename per file, so no file is ever half-written), and the manifest is
replaced last. A run that dies half-way leaves complete files, and the next run finds them ``unchanged``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "curry_train/MANIFEST.json"
EXECUTABLE = 0o755


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(repo: Path) -> dict | None:
    """The repository's manifest, ``None`` when there is none; a damaged one is an error naming the file."""
    path = repo / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a curry-train manifest ({e}); restore it from git or move it away") from None
    return manifest


@dataclass
class SyncReport:
    actions: dict[str, list[str]] = field(default_factory=lambda: {
        k: [] for k in ("new", "updated", "unchanged", "overwritten", "removed", "kept")})
    diffs: dict[str, str] = field(default_factory=dict)
    backups: dict[str, str] = field(default_factory=dict)

    def lines(self, count_new: bool = False) -> list[str]:
        """One line per file that changed or needs the user's attention (unchanged files, and new ones with
        ``count_new``, are counted)."""
        out = [f"  {'new':11s} {len(self.actions['new'])} file(s)"] if count_new and self.actions["new"] else []
        for action in ("updated", "overwritten", "removed", "kept") if count_new else \
                ("new", "updated", "overwritten", "removed", "kept"):
            for rel in self.actions[action]:
                note = ""
                if action == "kept":
                    note = "  (edited by you: left alone; --force replaces it, keeping a .orig copy)"
                elif action == "overwritten":
                    note = f"  (yours kept as {self.backups[rel]})"
                out.append(f"  {action:11s} {rel}{note}")
        if self.actions["unchanged"]:
            out.append(f"  {'unchanged':11s} {len(self.actions['unchanged'])} file(s)")
        return out


def _diff(rel: str, current: bytes, new: bytes, version: str) -> str:
    try:
        a, b = current.decode().splitlines(keepends=True), new.decode().splitlines(keepends=True)
    except UnicodeDecodeError:
        return f"(binary file {rel} differs)\n"
    return "".join(difflib.unified_diff(a, b, f"{rel} (yours)", f"{rel} (curry-train {version})"))


def _backup_name(path: Path) -> Path:
    backup = path.with_name(path.name + ".orig")
    n = 1
    while backup.exists():  # never overwrite an earlier .orig: that would lose the user's older edit
        backup, n = path.with_name(f"{path.name}.orig.{n}"), n + 1
    return backup


def plan(repo: Path, files: dict[str, bytes], old: dict[str, str], force: bool, version: str) -> SyncReport:
    """Decide every file's action without touching the disk (``old``: the manifest's path -> sha256)."""
    report = SyncReport()
    for rel, content in sorted(files.items()):
        path = repo / rel
        if not path.exists():
            report.actions["new"].append(rel)
            continue
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder, where curry-train would write a file; move it away")
        current = path.read_bytes()
        if current == content:
            report.actions["unchanged"].append(rel)
        elif old.get(rel) == sha256(current):
            report.actions["updated"].append(rel)
        elif force:
            report.actions["overwritten"].append(rel)
            report.backups[rel] = str(_backup_name(path).relative_to(repo))
        else:
            report.actions["kept"].append(rel)
            report.diffs[rel] = _diff(rel, current, content, version)
    for rel in sorted(set(old) - set(files)):
        path = repo / rel
        if not path.is_file():
            continue
        if old[rel] == sha256(path.read_bytes()):
            report.actions["removed"].append(rel)
        else:
            report.actions["kept"].append(rel)
            report.diffs[rel] = f"{rel}: curry-train {version} no longer has this file; yours is edited, so it stays\n"
    return report


def apply(repo: Path, files: dict[str, bytes], report: SyncReport, manifest: dict, old: dict[str, str],
          executable: set[str] = frozenset(), unrecorded: set[str] = frozenset()) -> None:
    """Carry out ``report`` and write ``manifest`` (its ``files`` table is filled in here), atomically per file.

    Kept files keep their old recorded hash (they stay "edited" for the next run); files that were never ours
    and were kept are not recorded at all, nor are ``unrecorded`` files (written once, then the user's)."""
    recorded = {}
    writes = report.actions["new"] + report.actions["updated"] + report.actions["overwritten"]
    for rel in writes + report.actions["unchanged"]:
        if rel not in unrecorded:
            recorded[rel] = sha256(files[rel])
    for rel in report.actions["kept"]:
        if rel in old:
            recorded[rel] = old[rel]
    manifest = {**manifest, "files": dict(sorted(recorded.items()))}

    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".curry-train-staging-", dir=repo))
    try:
        staged = {}
        for i, rel in enumerate(writes + [MANIFEST]):
            data = files[rel] if rel != MANIFEST else (json.dumps(manifest, indent=2) + "\n").encode()
            tmp = staging / str(i)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.chmod(EXECUTABLE if rel in executable else 0o644)
            staged[rel] = tmp
        for rel, backup in report.backups.items():
            shutil.copy2(repo / rel, repo / backup)
        for rel, tmp in staged.items():  # the manifest is last: it only ever describes files already in place
            target = repo / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        for rel in report.actions["removed"]:
            (repo / rel).unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_executable(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IXUSR)
