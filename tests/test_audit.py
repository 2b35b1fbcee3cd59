"""The audit log: hash-chained JSON lines; ``fedward audit-log verify`` names any edited, deleted or
reordered record; appends from several processes at once stay one consistent chain."""
from __future__ import annotations

import json
import multiprocessing
import subprocess
from pathlib import Path

import pytest

from conftest import BIN
from sitekit.audit import GENESIS, AuditLog, AuditLogError, canonical, record_hash, tensors_digest, verify


def make_log(tmp_path: Path, n: int = 6) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("plan_shipped", site="hospital-a", plan_sha256="ab" * 32)
    for i in range(1, n):
        log.append("update_received", site="hospital-a" if i % 2 else "hospital-b", round=i // 2, task="train",
                   bytes=602_540, sha256=f"{i:064x}", dp=None)
    return log


def rewrite(log: AuditLog, lines: list[str]) -> Path:
    log.path.write_text("\n".join(lines) + "\n")
    return log.path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedward"), "audit-log", "verify", *args], capture_output=True, text=True, timeout=60)


def test_records_are_chained_and_verify(tmp_path):
    log = make_log(tmp_path)
    recs = log.records()
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[0]["prev"] == GENESIS
    for before, after in zip(recs, recs[1:]):
        assert after["prev"] == before["hash"] == record_hash(before)
    result = verify(log.path, expect_head=log.head())
    assert result.ok and result.records == 6 and result.head == recs[-1]["hash"]
    out = cli(str(log.path), "--head", log.head())
    assert out.returncode == 0 and f"6 records, head {log.head()}" in out.stdout


def test_an_edited_record_is_named(tmp_path):
    log = make_log(tmp_path)
    lines = log.path.read_text().splitlines()
    rec = json.loads(lines[3])
    rec["data"]["bytes"] = 12  # someone makes an update look smaller
    rewrite(log, lines[:3] + [json.dumps(rec)] + lines[4:])
    result = verify(log.path)
    assert not result.ok
    assert result.problems == ("line 4 (seq 4, update_received): its content does not match its hash: the record was edited",)
    out = cli(str(log.path))
    assert out.returncode == 1 and "line 4 (seq 4, update_received)" in out.stderr and "edited" in out.stderr


def test_an_edited_and_rehashed_record_breaks_the_next_link(tmp_path):
    log = make_log(tmp_path)
    lines = log.path.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["data"]["site"] = "hospital-z"
    rec["hash"] = record_hash(rec)  # a careful forger recomputes the record's own hash
    rewrite(log, lines[:2] + [canonical(rec).decode()] + lines[3:])
    result = verify(log.path)
    assert result.problems == ("line 4 (seq 4, update_received): its link to the record before it (line 3, seq 3) is broken: "
                               "that record was edited and re-hashed, or replaced",)


@pytest.mark.parametrize("index", [0, 2, 5])
def test_a_deleted_record_is_named(tmp_path, index):
    log = make_log(tmp_path)
    head = log.head()
    lines = log.path.read_text().splitlines()
    rewrite(log, lines[:index] + lines[index + 1:])
    result = verify(log.path, expect_head=head)
    assert not result.ok
    if index < 5:
        assert result.problems[0] == f"line {index + 1} (seq {index + 2}, update_received): seq {index + 1} missing before it: record(s) deleted"
    else:  # the last record: only the head kept elsewhere (MLflow tag) shows it
        assert verify(log.path).ok
        assert "records were removed from the end" in result.problems[0]
    out = cli(str(log.path), "--head", head)
    assert out.returncode == 1


def test_reordered_records_are_named(tmp_path):
    log = make_log(tmp_path)
    lines = log.path.read_text().splitlines()
    lines[2], lines[3] = lines[3], lines[2]
    rewrite(log, lines)
    result = verify(log.path)
    assert result.problems == (
        "line 3 (seq 4, update_received): comes before seq 3 (line 4): records were reordered",
        "line 4 (seq 3, update_received): comes after seq 4: records were reordered",
    )
    out = cli(str(log.path))
    assert out.returncode == 1 and "reordered" in out.stderr


def test_a_replayed_record_and_an_appended_one_after_sealing(tmp_path):
    log = make_log(tmp_path)
    head = log.head()
    lines = log.path.read_text().splitlines()
    rewrite(log, lines + [lines[1]])
    result = verify(log.path, expect_head=head)
    assert "line 7 (seq 2, update_received): repeats seq 2 of line 2" in result.problems[0]
    assert "records were appended after the log was sealed" in result.problems[1]


def test_a_torn_last_line_is_reported_and_never_extended(tmp_path):
    log = make_log(tmp_path)
    with open(log.path, "ab") as f:
        f.write(b'{"seq": 7, "kind": "upd')  # a crash in the middle of a write
    assert "line 7: the last record is incomplete" in verify(log.path).problems[0]
    with pytest.raises(AuditLogError, match="incomplete"):
        log.append("model_registered", name="x", version="1")
    assert log.path.read_bytes().endswith(b'"upd')  # nothing was added after the damage


def test_garbage_is_not_a_record(tmp_path):
    log = make_log(tmp_path)
    lines = log.path.read_text().splitlines()
    rewrite(log, lines[:1] + ["not json at all"] + lines[1:])
    assert verify(log.path).problems[0] == "line 2: not a valid audit record (edited or damaged)"


def _append_many(path: str, who: str, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.append("update_received", site=who, round=i, bytes=i)


def test_concurrent_appends_from_several_processes_stay_one_chain(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, f"site-{k}", 40)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    result = verify(path)
    assert result.ok, result.problems
    recs = AuditLog(path).records()
    assert [r["seq"] for r in recs] == list(range(1, 121))
    for k in range(3):  # each writer's own records in its order
        assert [r["data"]["round"] for r in recs if r["data"]["site"] == f"site-{k}"] == list(range(40))


def test_tensor_digest_covers_names_and_bytes_not_order():
    a = [("model.w|trained", b"\x00\x01\x02\x03"), ("model.b|trained", b"\x04")]
    assert tensors_digest(a) == tensors_digest(list(reversed(a)))
    assert tensors_digest(a) != tensors_digest([("model.w|trained", b"\x00\x01\x02\x07"), a[1]])  # one byte
    assert tensors_digest(a) != tensors_digest([("model.v|trained", a[0][1]), a[1]])  # a name
    # name/bytes boundaries are length-prefixed: moving a byte from a name into the data changes the digest
    assert tensors_digest([("ab", b"c")]) != tensors_digest([("a", b"bc")])


def test_missing_file(tmp_path):
    result = verify(tmp_path / "nope.jsonl")
    assert not result.ok and "cannot be read" in result.problems[0]
    assert cli(str(tmp_path / "nope.jsonl")).returncode == 1


@pytest.mark.parametrize("field, value", [
    ("hash", [1, 2]),            # once: TypeError, unhashable list
    ("prev", {"a": 1}),          # once: TypeError, unhashable dict
    ("seq", float("inf")),       # once: OverflowError
    ("seq", 2.0),
    ("seq", True),
    ("kind", 7),
])
def test_a_record_field_of_the_wrong_type_is_a_damaged_record_not_a_crash(tmp_path, field, value):
    log = make_log(tmp_path)
    lines = log.path.read_text().splitlines()
    rec = json.loads(lines[1])
    rec[field] = value
    rewrite(log, [lines[0], json.dumps(rec), *lines[2:]])
    result = verify(log.path)
    assert not result.ok and result.problems[0] == "line 2: not a valid audit record (edited or damaged)"
    assert cli(str(log.path)).returncode == 1


def test_a_huge_seq_is_reported_without_walking_the_gap(tmp_path):
    # once: a list comprehension over the gap; seq 10**12 never finished
    log = make_log(tmp_path)
    lines = log.path.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["seq"] = 10**12
    rewrite(log, [lines[0], json.dumps(rec), *lines[2:]])
    result = verify(log.path)
    assert not result.ok
    assert "line 2 (seq 1000000000000, update_received): seq 2-999999999999 missing before it" in result.problems[1]


def test_an_empty_log_fails(tmp_path):
    empty = tmp_path / "audit.jsonl"
    empty.write_bytes(b"")
    result = verify(empty)
    assert not result.ok and "holds no audit records" in result.problems[0]
    assert cli(str(empty)).returncode == 1


def test_control_codes_in_a_kind_never_reach_the_terminal(tmp_path):
    log = make_log(tmp_path)
    lines = log.path.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["kind"] = "\x1b[2Jgone"
    rewrite(log, [lines[0], json.dumps(rec), *lines[2:]])
    out = cli(str(log.path))
    assert out.returncode == 1 and "\x1b" not in out.stdout + out.stderr and "?[2Jgone" in out.stdout + out.stderr
