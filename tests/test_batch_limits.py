"""Hostile batch files: odd JSON lines are per-line problems, rows are capped, memory is bounded."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from peak_memory import ENTRAFLOW_CLI, run_measuring_peak

from cli.main import cli
from entraflow import keys
from entraflow.settings import Settings, get_settings
from models.batch_reports import report_rows

GROUP = "7a3b5c1e-0000-4000-8000-000000000001"
OTHER_GROUP = "7a3b5c1e-0000-4000-8000-000000000002"
# Rows of the memory test and its bound. The command starts at about 115 MiB; before streaming,
# 100,000 rows took 250 MiB (a million, 1.4 GiB), after it any number takes about 120 MiB.
MEMORY_TEST_ROWS = 100_000
MEMORY_BOUND_MIB = 200
# One line larger than anything the bound allows to be read whole.
HUGE_LINE_BYTES = 400 * 1024 * 1024


def user(n: int) -> str:
    return str(uuid.UUID(int=(0xBEEF << 96) + n))


def row(n: int, action: str = "add", group_id: str = GROUP) -> dict[str, str]:
    return {"action": action, "user_id": user(n), "group_id": group_id}


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result.exit_code, result.stdout


def stored_batches() -> list[dict[str, object]]:
    code, out = invoke("batch", "list", "--json")
    assert code == 0, out
    batches: list[dict[str, object]] = json.loads(out)
    return batches


@pytest.fixture
def max_rows(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setenv("ENTRAFLOW_BATCH_MAX_ROWS", "3")
    get_settings.cache_clear()
    yield 3
    get_settings.cache_clear()


# --- finding 12: a JSON line is a problem of its own line, whatever it holds ---


def test_deep_nesting_huge_numbers_nan_repeated_keys_and_non_objects_are_problems_of_their_lines(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    huge_number = "9" * 4400  # past Python's 4,300-digit limit on int(), and the line's length
    lines = [
        json.dumps(row(1)),
        "[" * 100_000 + "]" * 100_000,
        '{"action": ' + "[" * 1500 + "]" * 1500 + "}",  # short enough, too deep to parse
        '{"action": "add", "user_id": ' + huge_number + f', "group_id": "{GROUP}"}}',
        f'{{"action": NaN, "user_id": "{user(2)}", "group_id": "{GROUP}"}}',
        f'{{"action": "add", "action": "remove", "user_id": "{user(2)}", "group_id": "{GROUP}"}}',
        "[1, 2]",
        '"add"',
        "null",
        json.dumps(row(3)),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")

    code, out = invoke("batch", "submit", str(path), "--json")

    assert code == 1, out
    error = json.loads(out)["error"]
    assert [p["line"] for p in error["problems"]] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert error["message"].startswith("8 invalid row(s), nothing queued")
    messages = [p["message"] for p in error["problems"]]
    assert messages[:2] == [
        "the line is longer than 4096 characters",
        "the line is nested too deeply",
    ]
    assert messages[2] == "the line is longer than 4096 characters"
    assert messages[3] == "the line holds NaN, which JSON does not allow"
    assert messages[4] == "the line has the key 'action' twice in one object"
    assert stored_batches() == []
    assert redis_client.llen(keys.BULK_QUEUE) == 0

    code, out = invoke("batch", "submit", str(path), "--json", "--skip-invalid")

    assert code == 0, out
    batch = json.loads(out)
    assert batch["total"] == 2
    assert [s["line"] for s in batch["skipped"]] == [2, 3, 4, 5, 6, 7, 8, 9]
    rows = report_rows(settings.resolved_database_url, batch["id"])
    assert [(r["line"], r["user_id"]) for r in rows] == [(1, user(1)), (10, user(3))]


# --- finding 14: a row cap, lines never read whole, bounded memory ---


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_file_with_more_rows_than_batch_max_rows_is_refused_naming_the_setting(
    redis_client: redis.Redis, max_rows: int, tmp_path: Path, suffix: str
) -> None:
    def write(count: int) -> Path:
        path = tmp_path / f"rows{count}{suffix}"
        records = [row(n) for n in range(count)]
        if suffix == ".csv":
            text = "action,user_id,group_id\n" + "".join(
                f"{r['action']},{r['user_id']},{r['group_id']}\n" for r in records
            )
        else:
            text = "".join(json.dumps(r) + "\n" for r in records)
        path.write_text(text)
        return path

    code, out = invoke("batch", "submit", str(write(max_rows + 1)), "--json")

    assert code == 1, out
    error = json.loads(out)["error"]
    assert error["outcome"] == "invalid_input"
    assert "ENTRAFLOW_BATCH_MAX_ROWS" in error["message"]
    assert f"more than {max_rows} rows" in error["message"]
    assert stored_batches() == []
    assert redis_client.llen(keys.BULK_QUEUE) == 0

    code, out = invoke("batch", "submit", str(write(max_rows)), "--json")

    assert code == 0, out
    assert json.loads(out)["total"] == max_rows


def test_the_row_cap_holds_for_dry_runs_and_group_sync_member_lists(
    max_rows: int, tmp_path: Path
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text(
        "action,user_id,group_id\n" + "".join(f"add,{user(n)},{GROUP}\n" for n in range(4))
    )
    members = tmp_path / "members.txt"
    members.write_text("".join(f"{user(n)}\n" for n in range(4)))

    for args in (
        ("batch", "submit", str(rows), "--dry-run", "--json"),
        ("group", "sync", GROUP, "--members", str(members), "--dry-run", "--json"),
    ):
        code, out = invoke(*args)
        assert code == 1, out
        assert "ENTRAFLOW_BATCH_MAX_ROWS" in json.loads(out)["error"]["message"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_an_overlong_line_is_a_problem_of_its_line(
    settings: Settings, tmp_path: Path, suffix: str
) -> None:
    long_value = "x" * 100_000
    if suffix == ".csv":
        text = f"action,user_id,group_id\nadd,{user(1)},{GROUP}\nadd,{long_value},{GROUP}\n"
        text += f"add,{user(2)},{GROUP}\n"
        long_line, last_line = 3, 4
    else:
        text = json.dumps(row(1)) + "\n" + json.dumps(row(9, long_value)) + "\n"
        text += json.dumps(row(2)) + "\n"
        long_line, last_line = 2, 3
    path = tmp_path / f"rows{suffix}"
    path.write_text(text)

    code, out = invoke("batch", "submit", str(path), "--json", "--skip-invalid")

    assert code == 0, out
    batch = json.loads(out)
    [skipped] = batch["skipped"]
    assert skipped["line"] == long_line
    assert "longer than" in skipped["message"]
    rows = report_rows(settings.resolved_database_url, batch["id"])
    assert [r["line"] for r in rows] == [long_line - 1, last_line]


def test_repeated_rows_are_dropped_and_contradicting_rows_refused_when_streamed(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "rows.csv"
    path.write_text(
        "action,user_id,group_id\n"
        f"add,{user(1)},{GROUP}\n"
        f"add,{user(2)},{GROUP}\n"
        f"add,{user(1).upper()},{GROUP}\n"
        f"remove,{user(1)},{GROUP}\n"
        f"add,{user(1)},{OTHER_GROUP}\n"
        f"remove,{user(2)},{GROUP}\n"
    )

    code, out = invoke("batch", "submit", str(path), "--json")

    assert code == 1, out
    assert json.loads(out)["error"]["problems"] == [
        {"line": 5, "message": "remove contradicts the add on line 2"},
        {"line": 7, "message": "remove contradicts the add on line 3"},
    ]
    assert stored_batches() == []

    code, out = invoke("batch", "submit", str(path), "--json", "--skip-invalid")

    assert code == 0, out
    batch = json.loads(out)
    assert batch["total"] == 3
    assert batch["duplicates"] == [{"line": 4, "duplicate_of": 2}]
    rows = report_rows(settings.resolved_database_url, batch["id"])
    assert [r["line"] for r in rows] == [2, 3, 6]


def _submit_in_a_process(settings: Settings, path: Path, *args: str) -> tuple[int, str, float]:
    """Exit code, output and peak resident memory in MiB of a real `entraflow batch submit`."""
    env = {
        **os.environ,
        "ENTRAFLOW_HOME": str(settings.home),
        "ENTRAFLOW_DATABASE_URL": settings.resolved_database_url,
        "ENTRAFLOW_REDIS_URL": str(settings.redis_url),
        "ENTRAFLOW_BATCH_MAX_ROWS": str(MEMORY_TEST_ROWS),
    }
    output = path.with_suffix(".out")
    with output.open("wb") as out:
        code, peak_mib = run_measuring_peak(
            ENTRAFLOW_CLI,
            ["batch", "submit", str(path), "--json", *args],
            env=env,
            stdout=out,
            stderr=subprocess.DEVNULL,
            peak_path=path.with_suffix(".peak"),
        )
    return code, output.read_text(), peak_mib


def test_a_large_csv_is_submitted_in_bounded_memory(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    with path.open("w") as out:
        out.write("action,user_id,group_id\n")
        for n in range(MEMORY_TEST_ROWS):
            out.write(f"add,{user(n)},{GROUP}\n")

    code, out, peak_mib = _submit_in_a_process(settings, path)

    assert code == 0, out
    assert json.loads(out)["total"] == MEMORY_TEST_ROWS
    assert peak_mib < MEMORY_BOUND_MIB


def test_a_line_of_hundreds_of_megabytes_is_never_read_whole(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "rows.jsonl"
    chunk = b"x" * (1024 * 1024)
    with path.open("wb") as out:
        out.write(json.dumps(row(1)).encode() + b"\n")
        out.write(b'{"action": "')
        for _ in range(HUGE_LINE_BYTES // len(chunk)):
            out.write(chunk)
        out.write(b'"}\n')

    code, out, peak_mib = _submit_in_a_process(settings, path, "--skip-invalid")

    assert code == 0, out
    assert json.loads(out)["total"] == 1
    assert peak_mib < MEMORY_BOUND_MIB
