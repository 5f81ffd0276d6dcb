"""Data errors that name file, row (1-based), field and reason — all of a file at once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowIssue:
    file: str
    row: int | None  # 1-based; None for file-level problems
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = self.file + (f", row {self.row}" if self.row is not None else "")
        return f"{where}" + (f", field '{self.field}'" if self.field else "") + f": {self.reason}"


class DataError(ValueError):
    """Raised with every issue found in a file (up to a cap), before any model loads."""

    def __init__(self, issues: list[RowIssue], total: int | None = None):
        self.issues = issues
        total = len(issues) if total is None else total
        more = f"\n  ... and {total - len(issues)} more" if total > len(issues) else ""
        super().__init__(f"{total} data error(s):\n  " + "\n  ".join(map(str, issues)) + more)


class IssueCollector:
    """Collects row issues up to ``cap`` (counting the rest) and raises them together."""

    def __init__(self, file: str, cap: int = 20):
        self.file, self.cap, self.issues, self.total = file, cap, [], 0

    def add(self, row: int | None, field: str | None, reason: str) -> None:
        self.total += 1
        if len(self.issues) < self.cap:
            self.issues.append(RowIssue(self.file, row, field, reason))

    def raise_if_any(self) -> None:
        if self.total:
            raise DataError(self.issues, self.total)
