"""The audit log: append-only JSON lines, each record chained to the one before it by its hash.

One record per line::

    {"seq": 7, "time": "2026-12-04T06:13:00.123456+00:00", "kind": "update_received",
     "data": {"site": "hospital-a", "round": 1, "task": "train", "bytes": 1204312, "tensors": 42,
              "sha256": "...", "dp": null},
     "prev": "<hash of record 6>", "hash": "<sha256 of this record without 'hash'>"}

``hash`` is the SHA-256 of the record's canonical JSON (sorted keys, no spaces) without the
``hash`` field, so it covers ``seq``, ``time``, ``kind``, ``data`` and ``prev``. The first record's
``prev`` is 64 zeros. Changing any byte of a record breaks its own hash; deleting, inserting or
moving a record breaks the next record's ``prev`` and the ``seq`` count. Removing records from the
*end* leaves a shorter valid chain: keep the last hash (the *head*) somewhere else (fedward puts it
in MLflow as the run tag ``fedward.audit.head``) and verify against it with ``expect_head``.

Appends are atomic: an exclusive ``flock`` across processes, one ``write`` of one whole line
(``O_APPEND``), then ``fsync``. A torn last line (a crash mid-write) is reported, never extended.
Standard library only: the aggregator's image can write this log too.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

GENESIS = "0" * 64
# What fedward records (other kinds are allowed; these are the ones the pipeline writes).
KINDS = ("federation_checked", "plan_shipped", "approval", "round_started", "update_received",
         "federation_finished", "federation_failed", "model_registered", "promotion")


class AuditLogError(RuntimeError):
    """The log is damaged (a torn or invalid line) and must not be appended to."""


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def record_hash(record: dict) -> str:
    """SHA-256 of the record without its own ``hash`` field."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def tensors_digest(named: Iterable[tuple[str, bytes]]) -> str:
    """One SHA-256 over a set of tensors, independent of their order: names and raw bytes, sorted by name."""
    h = hashlib.sha256()
    for name, data in sorted(named, key=lambda t: t[0]):
        n = name.encode("utf-8")
        h.update(len(n).to_bytes(8, "big") + n + len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _last_line(f) -> bytes:
    """The file's last line (without its newline), read backwards in blocks; b'' for an empty file."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    if end == 0:
        return b""
    f.seek(end - 1)
    if f.read(1) != b"\n":
        raise AuditLogError("its last record is incomplete (no end of line): a write was interrupted; "
                            "keep the file as evidence and start a new log")
    buf, pos = b"", end - 1  # buf holds bytes [pos, end - 1): everything before the final newline
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        i = buf.rfind(b"\n")
        if i != -1:
            return buf[i + 1:]
    return buf


class AuditLog:
    """An append-only, hash-chained JSON-lines file; safe to append to from several processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, kind: str, **data: Any) -> dict:
        """Append one record; return it (with ``seq`` and ``hash``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
            with os.fdopen(fd, "r+b", buffering=0, closefd=False) as f:
                last = _last_line(f)
            prev_seq, prev_hash = 0, GENESIS
            if last:
                try:
                    prev = json.loads(last)
                    prev_seq, prev_hash = int(prev["seq"]), str(prev["hash"])
                except (ValueError, KeyError, TypeError):
                    raise AuditLogError("its last record is not a valid audit record; keep the file as evidence "
                                        "and start a new log") from None
            record = {"seq": prev_seq + 1, "time": dt.datetime.now(dt.timezone.utc).isoformat(),
                      "kind": kind, "data": data, "prev": prev_hash}
            record["hash"] = record_hash(record)
            os.write(fd, canonical(record) + b"\n")  # O_APPEND: one write of one whole line, at the end
            os.fsync(fd)
        except AuditLogError as exc:
            raise AuditLogError(f"{self.path}: {exc}") from None
        finally:
            os.close(fd)
        return record

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def head(self) -> str:
        """The last record's hash (GENESIS for an empty or missing log)."""
        if not self.path.exists():
            return GENESIS
        with open(self.path, "rb") as f:
            last = _last_line(f)
        return json.loads(last)["hash"] if last else GENESIS


@dataclass(frozen=True)
class Verification:
    ok: bool
    records: int
    head: str
    problems: tuple[str, ...]

    def summary(self) -> str:
        if self.ok:
            return f"audit log intact: {self.records} records, head {self.head}"
        return "audit log FAILED verification: " + "; ".join(self.problems)


def verify(path: str | Path, expect_head: str | None = None) -> Verification:
    """Check every record's hash, every link and the sequence; say which record is wrong and how.

    Reports, by line number (1-based) and ``seq``: a record whose content no longer matches its
    hash (edited), a gap in ``seq`` (records deleted), a ``seq`` that goes backwards or repeats
    (records moved or copied), a link to a previous record that is not the one before it
    (deleted, inserted or moved records), and, with ``expect_head``, a log whose last record is not
    the expected one (records removed from the end, or the log replaced)."""
    path = Path(path)
    problems: list[str] = []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return Verification(False, 0, GENESIS, (f"{path}: cannot be read ({exc.strerror})",))
    if raw and not raw.endswith(b"\n"):
        torn = raw.count(b"\n") + 1
        problems.append(f"line {torn}: the last record is incomplete (no end of line): a write was interrupted or the file cut")
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    records: list[tuple[int, dict]] = []
    for no, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not {"seq", "kind", "prev", "hash", "data", "time"} <= set(rec):
                raise ValueError
            # the types append() writes; anything else (a list for a hash, seq 1e12 or Infinity) was not written by it
            if (isinstance(rec["seq"], bool) or not isinstance(rec["seq"], int) or not 1 <= rec["seq"] <= 2**53
                    or not all(isinstance(rec[k], str) for k in ("kind", "prev", "hash"))):
                raise ValueError
        except (ValueError, TypeError, RecursionError):
            problems.append(f"line {no}: not a valid audit record (edited or damaged)")
            continue
        records.append((no, rec))
    if not records and not problems:
        problems.append(f"{path}: holds no audit records; a run's log starts with its first record, so this one was "
                        "emptied or is not an audit log")
    by_hash = {rec["hash"]: (no, rec) for no, rec in records}
    line_of_seq: dict[int, int] = {}
    for no, rec in records:
        line_of_seq.setdefault(int(rec["seq"]), no)
    prev_hash, prev_seq, prev_no, highest = GENESIS, 0, 0, 0
    for no, rec in records:
        seq = int(rec["seq"])
        kind = "".join(c if c.isprintable() else "?" for c in rec["kind"][:60])  # never pass control codes to a terminal
        what = f"line {no} (seq {seq}, {kind})"
        if record_hash(rec) != rec["hash"]:
            problems.append(f"{what}: its content does not match its hash: the record was edited")
        ordered = True
        if line_of_seq[seq] != no:
            ordered = False
            problems.append(f"{what}: repeats seq {seq} of line {line_of_seq[seq]}: a record was copied or replayed")
        elif seq <= highest:
            ordered = False
            problems.append(f"{what}: comes after seq {highest}: records were reordered")
        elif seq > highest + 1:
            # never walk the gap itself: an edited seq can open one of 2**53
            moved = sorted(m for m in line_of_seq if highest < m < seq)
            if len(moved) < seq - highest - 1:
                first, last = highest + 1, seq - 1
                while first in line_of_seq:
                    first += 1
                while last in line_of_seq:
                    last -= 1
                span = f"seq {first}" if first == last else f"seq {first}-{last}"
                problems.append(f"{what}: {span} missing before it: record(s) deleted")
            if moved:
                ordered = False
                problems.append(f"{what}: comes before seq {moved[0]} (line {line_of_seq[moved[0]]}): records were reordered")
        if rec["prev"] != prev_hash and seq == prev_seq + 1 and ordered:
            linked = by_hash.get(rec["prev"])
            if linked is None:
                problems.append(f"{what}: its link to the record before it (line {prev_no}, seq {prev_seq}) is broken: "
                                "that record was edited and re-hashed, or replaced")
            else:
                problems.append(f"{what}: is chained to line {linked[0]} (seq {linked[1]['seq']}), not to the record "
                                f"before it (line {prev_no}): the log was spliced")
        prev_hash, prev_seq, prev_no, highest = rec["hash"], seq, no, max(highest, seq)
    head = records[-1][1]["hash"] if records else GENESIS
    if expect_head is not None and head != expect_head:
        if expect_head in by_hash:
            no, rec = by_hash[expect_head]
            problems.append(f"the expected head is line {no} (seq {rec['seq']}), but {len(records) - records.index((no, rec)) - 1} "
                            "record(s) follow it: records were appended after the log was sealed")
        else:
            problems.append(f"the last record (hash {head[:16]}...) is not the expected head {expect_head[:16]}...: "
                            "records were removed from the end, or the log was replaced")
    return Verification(not problems, len(records), head, tuple(problems))
