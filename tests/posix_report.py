"""Pytest plugin: per-syscall summary of the POSIX conformance suite (test_60_posix.py).

At the end of a run that included tests from test_60_posix.py, prints a table of passed / failed
(errors count as failed) / skipped tests per group (the syscall in ``test_<group>_...``) and per
``fsroot`` parameter (localdir, cryptfs).  If the environment variable CRYPTFS_POSIX_REPORT names
a file, the same table is written there as Markdown.  Prints nothing when no posix test ran.
"""

from __future__ import annotations

import os
import re

POSIX_MODULE = "test_60_posix.py"
FSROOTS = ("localdir", "cryptfs")
OUTCOMES = ("passed", "failed", "skipped")
_GROUP_RE = re.compile(r"^test_([a-z0-9]+)_")


def _group(nodeid: str) -> str:
    name = nodeid.rsplit("::", 1)[-1].split("[", 1)[0]
    match = _GROUP_RE.match(name)
    return match.group(1) if match else name


def _fsroot(report) -> str:
    for key, value in getattr(report, "user_properties", ()):
        if key == "fsroot":
            return str(value)
    params = report.nodeid.rpartition("[")[2].rstrip("]").split("-")
    for candidate in FSROOTS:
        if candidate in params:
            return candidate
    return "?"


def _collect(terminalreporter) -> dict[tuple[str, str], dict[str, int]]:
    """(group, fsroot) -> outcome counts, one outcome per test item."""
    per_test: dict[str, tuple[str, str, str]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            nodeid = getattr(report, "nodeid", "")
            when = getattr(report, "when", None)
            if when is None or POSIX_MODULE not in nodeid.split("::", 1)[0]:
                continue
            if report.failed:
                outcome = "failed"
            elif report.skipped:
                outcome = "skipped"
            elif when == "call":
                outcome = "passed"
            else:
                outcome = None  # a passing setup/teardown says nothing on its own
            previous = per_test.get(nodeid)
            fsroot = _fsroot(report)
            if previous is not None:
                if fsroot == "?":
                    fsroot = previous[1]
                if outcome is None or previous[2] == "failed":
                    outcome = previous[2]
                elif outcome == "passed" and previous[2] == "skipped":
                    outcome = "skipped"
            per_test[nodeid] = (_group(nodeid), fsroot, outcome)
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for group, fsroot, outcome in per_test.values():
        if outcome is None:
            continue
        cell = counts.setdefault((group, fsroot), dict.fromkeys(OUTCOMES, 0))
        cell[outcome] += 1
    return counts


def _table(counts) -> tuple[list[str], list[list[str]]]:
    roots = [r for r in FSROOTS if any(k[1] == r for k in counts)]
    roots += sorted({k[1] for k in counts} - set(roots))
    groups = sorted({k[0] for k in counts})
    header = ["group"]
    for root in roots:
        header += [f"{root} passed", f"{root} failed", f"{root} skipped"]
    rows = []
    totals = {root: dict.fromkeys(OUTCOMES, 0) for root in roots}
    for group in groups:
        row = [group]
        for root in roots:
            cell = counts.get((group, root), dict.fromkeys(OUTCOMES, 0))
            for outcome in OUTCOMES:
                totals[root][outcome] += cell[outcome]
            row += [str(cell[o]) for o in OUTCOMES]
        rows.append(row)
    total_row = ["total"]
    for root in roots:
        total_row += [str(totals[root][o]) for o in OUTCOMES]
    rows.append(total_row)
    return header, rows


def _plain(header, rows) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells)

    rule = "-" * len(fmt(header))
    return [fmt(header), rule, *(fmt(r) for r in rows[:-1]), rule, fmt(rows[-1])]


def _markdown(header, rows) -> str:
    lines = ["# POSIX conformance (tests/test_60_posix.py)", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows[:-1]:
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| " + " | ".join(f"**{c}**" for c in rows[-1]) + " |")
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = _collect(terminalreporter)
    if not counts:
        return
    header, rows = _table(counts)
    terminalreporter.section("POSIX conformance per syscall")
    for line in _plain(header, rows):
        terminalreporter.write_line(line)
    path = os.environ.get("CRYPTFS_POSIX_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as out:
            out.write(_markdown(header, rows))
        terminalreporter.write_line(f"markdown report written to {path}")
