"""The control plane: an SQLite index of runs and the queue of pending approvals.

It lives *beside* the runs dir, in ``<runs_dir>.control/control.db`` (for ``./runs``:
``./runs.control/control.db``), so it is never inside a run folder and is hidden from every
sandbox like the runs dir. It is an index, not a record: every decision that matters is also in
the run folder, and ``kernel reconcile`` rebuilds the index from the folders (the folder wins).
The kernel never trusts a row: it acts only on reviewer signatures it verifies itself.

Permissions. The directory is created ``02770`` (setgid: files made in it keep its group) and the
database ``0660``. To let reviewers on other accounts decide, give the directory and the database
a group they are in (``chgrp -R reviewers runs.control``); SQLite creates its journal with the
database's mode. Anyone who can write the database can delete or reorder rows (deny service),
but cannot approve anything: approvals are signatures by keys the run's policy trusts.

Concurrency. Every decision is one ``BEGIN IMMEDIATE`` transaction that re-reads the request's
state and changes it only from ``pending`` (two reviewers racing get exactly one decision; the
other is told it was already decided).

Schema (sqlite-utils tables):

``runs``        run_id (pk), run_dir, workspace, policy_name, policy_digest, argv, operator_uid,
                isolation, kernel_pid, status, exit_code, requests, denials, started, ended,
                seal, final_tree_digest, parent (the spawning run's id; null for a root),
                root (the id of the tree's root run; its own id for a root), depth (0 for a
                root, 1 for its children, ...). A database made before the agent-tree columns
                existed gets them added when it is opened (null until ``kernel reconcile``).
``approvals``   id (pk, ``<run_id>.<approval_seq>``), run_id, request_seq, approval_seq, kind,
                summary, rule, rule_reason, justification, binding (the signed fields, JSON),
                eligible (JSON), threshold, operator_uid, operator_may_approve, preview (JSON),
                usage (JSON), lineage (JSON), state (``pending`` ``approved`` ``denied``
                ``expired`` ``cancelled``), outcome, created_ns, expires_ns, decided_ns
``signatures``  id (pk), approval_id, envelope (JSON), public_key, reviewer, decision,
                submitted_ns, submitted_uid, status (``submitted`` or ``refused``), note
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel.errors import BadInputError, NotFoundError

if TYPE_CHECKING:
    import sqlite_utils

# What `kernel exec` does here (create the schema if missing, upsert its run's row) is plain
# sqlite3: importing sqlite_utils costs about 50-80 ms, so it is imported only by the
# reading/administration commands, on first use of `ControlPlane.db`.
_SQL_TYPES = {str: "TEXT", int: "INTEGER"}

DB_NAME = "control.db"
PENDING = "pending"
BUSY_TIMEOUT_S = 30.0

RUN_COLUMNS: dict[str, Any] = {
    "run_id": str, "run_dir": str, "workspace": str, "policy_name": str, "policy_digest": str,
    "argv": str, "operator_uid": int, "isolation": str, "kernel_pid": int, "status": str,
    "exit_code": int, "requests": int, "denials": int, "started": str, "ended": str,
    "seal": str, "final_tree_digest": str, "parent": str, "root": str, "depth": int,
}
APPROVAL_COLUMNS: dict[str, Any] = {
    "id": str, "run_id": str, "request_seq": int, "approval_seq": int, "kind": str,
    "summary": str, "rule": str, "rule_reason": str, "justification": str, "binding": str,
    "eligible": str, "threshold": int, "operator_uid": int, "operator_may_approve": int,
    "preview": str, "usage": str, "lineage": str, "state": str, "outcome": str,
    "created_ns": int, "expires_ns": int, "decided_ns": int,
}
SIGNATURE_COLUMNS: dict[str, Any] = {
    "id": int, "approval_id": str, "envelope": str, "public_key": str, "reviewer": str,
    "decision": str, "submitted_ns": int, "submitted_uid": int, "status": str, "note": str,
}


def control_dir(runs_dir: Path) -> Path:
    """``<runs_dir>.control`` beside the runs dir."""
    runs_dir = Path(runs_dir).resolve()
    return runs_dir.parent / f"{runs_dir.name}.control"


def db_path(runs_dir: Path) -> Path:
    return control_dir(runs_dir) / DB_NAME


class ControlPlane:
    """One connection to the control-plane database."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self._db: sqlite_utils.Database | None = None

    @property
    def db(self) -> sqlite_utils.Database:
        """The sqlite_utils view of the connection (imported on first use)."""
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self.conn)
        return self._db

    # ---- opening ----

    @classmethod
    def open(cls, runs_dir: Path, *, create: bool) -> ControlPlane:
        """Open the database beside ``runs_dir``; ``create`` makes it (and its dir) if needed."""
        d = control_dir(runs_dir)
        path = d / DB_NAME
        if create:
            try:
                os.mkdir(d, 0o2770)
                os.chmod(d, 0o2770)  # noqa: S103 - shared with the reviewers group
            except FileExistsError:
                pass
            if not os.path.lexists(path):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o660)
                    os.fchmod(fd, 0o660)
                    os.close(fd)
                except FileExistsError:
                    pass
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise NotFoundError(f"control-plane database {path} does not exist",
                                hint="no run has used this runs dir yet; pass --runs-dir "
                                "to name the runs dir the operator used") from None
        if not stat.S_ISREG(st.st_mode):
            raise BadInputError(f"control-plane database {path} is not a regular file")
        try:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            cp = cls(path, conn)
            cp._schema()
        except sqlite3.DatabaseError as e:
            raise BadInputError(f"control-plane database {path}: {e}",
                                hint="check its permissions (docs/operating.md), or rebuild "
                                "it with `kernel reconcile`") from None
        return cp

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _schema(self) -> None:
        # The same tables and indexes sqlite_utils' create(..., if_not_exists=True) makes.
        for table, columns, pk in (("runs", RUN_COLUMNS, "run_id"),
                                   ("approvals", APPROVAL_COLUMNS, "id"),
                                   ("signatures", SIGNATURE_COLUMNS, "id")):
            cols = ",\n".join(f'   "{c}" {_SQL_TYPES[t]}' + (" PRIMARY KEY" if c == pk else "")
                              for c, t in columns.items())
            self.conn.execute(f'CREATE TABLE IF NOT EXISTS "{table}" (\n{cols}\n)')
            have = {row[1] for row in self.conn.execute(f'PRAGMA table_info("{table}")')}
            for c, t in columns.items():  # columns added since the database was made
                if c not in have:
                    with contextlib.suppress(sqlite3.OperationalError):  # added concurrently
                        self.conn.execute(f'ALTER TABLE "{table}" ADD COLUMN "{c}" '
                                          f"{_SQL_TYPES[t]}")
        for table, col in (("approvals", "state"), ("signatures", "approval_id")):
            self.conn.execute(f'CREATE INDEX IF NOT EXISTS "idx_{table}_{col}"\n'
                              f'    ON "{table}" ("{col}")')

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any exception)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ---- runs ----

    def upsert_run(self, row: dict[str, Any]) -> None:
        """Insert the run's row, or update the given columns of an existing one."""
        unknown = sorted(set(row) - set(RUN_COLUMNS))
        if unknown or "run_id" not in row:
            raise ValueError(f"runs row: unknown columns {unknown} or no run_id")
        cols = list(row)
        names = ", ".join(f'"{c}"' for c in cols)
        update = ", ".join(f'"{c}" = excluded."{c}"' for c in cols if c != "run_id")
        sql = (f'INSERT INTO "runs" ({names}) VALUES ({", ".join("?" for _ in cols)}) '  # noqa: S608 - fixed names
               f'ON CONFLICT("run_id") DO ' + (f"UPDATE SET {update}" if update else "NOTHING"))
        self.conn.execute(sql, tuple(row.values()))

    def runs(self) -> list[dict[str, Any]]:
        return list(self.db.table("runs").rows_where(order_by="started"))

    def children_of(self, run_id: str) -> list[dict[str, Any]]:
        """The runs ``run_id`` spawned, in the order they started."""
        return list(self.db.table("runs").rows_where("parent = ?", [run_id],
                                                      order_by="started"))

    def run(self, run_id: str) -> dict[str, Any] | None:
        rows = list(self.db.table("runs").rows_where("run_id = ?", [run_id]))
        return rows[0] if rows else None

    # ---- approvals ----

    def add_approval(self, row: dict[str, Any]) -> None:
        self.db.table("approvals").insert(row, pk="id", replace=True)

    def approval(self, approval_id: str) -> dict[str, Any] | None:
        rows = list(self.db.table("approvals").rows_where("id = ?", [approval_id]))
        return rows[0] if rows else None

    def approvals(self, state: str | None = PENDING) -> list[dict[str, Any]]:
        if state is None:
            return list(self.db.table("approvals").rows_where(order_by="created_ns"))
        return list(self.db.table("approvals").rows_where("state = ?", [state],
                                                    order_by="created_ns"))

    def approvals_of(self, run_id: str) -> list[dict[str, Any]]:
        return list(self.db.table("approvals").rows_where("run_id = ?", [run_id],
                                                    order_by="approval_seq"))

    def signatures_after(self, approval_id: str, after_id: int) -> list[dict[str, Any]]:
        return list(self.db.table("signatures").rows_where("approval_id = ? and id > ?",
                                                     [approval_id, after_id], order_by="id"))

    def signatures_of_run(self, run_id: str) -> list[dict[str, Any]]:
        """Every signature row of every request of ``run_id`` (ids are ``<run_id>.<seq>``)."""
        cur = self.conn.execute(
            "SELECT * FROM signatures WHERE substr(approval_id, 1, ?) = ? ORDER BY id",
            (len(run_id) + 1, run_id + "."))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def record_attempt(self, sig_row: dict[str, Any], note: str) -> None:
        """Store a refused attempt (the request was not pending) so the run can record it."""
        row = {**sig_row, "status": "refused", "note": note}
        with self.transaction() as c:
            c.execute(f"INSERT INTO signatures ({', '.join(row)}) VALUES "  # noqa: S608
                      f"({', '.join('?' for _ in row)})", tuple(row.values()))

    def finish(self, approval_id: str, state: str, outcome: str, now_ns: int) -> None:
        """The kernel's final word for a request (the run folder already holds it)."""
        with self.transaction() as c:
            c.execute("UPDATE approvals SET state = ?, outcome = ?, decided_ns = ? WHERE id = ?",
                      (state, outcome, now_ns, approval_id))

    def submit(self, approval_id: str, sig_row: dict[str, Any], *, threshold: int,
               now_ns: int, check: Any) -> str:
        """Record a reviewer's signed decision, atomically.

        ``check(row) -> (ok, reason)`` runs inside the transaction on the freshly read row.
        Returns the new state (``pending``, ``approved`` or ``denied``). Raises LookupError
        (unknown), ``ClosedError`` (not pending / expired) or ``RefusedError`` (after recording
        the refused attempt, so the live kernel records it in the run folder).
        """
        refused: str | None = None
        with self.transaction() as c:
            cur = c.execute("SELECT state, expires_ns FROM approvals WHERE id = ?",
                            (approval_id,))
            got = cur.fetchone()
            if got is None:
                raise LookupError(approval_id)
            state, expires_ns = got
            if state != PENDING:
                raise ClosedError(f"already {state}")
            if now_ns > expires_ns:
                raise ClosedError("expired")
            dup = c.execute("SELECT count(*) FROM signatures WHERE approval_id = ? AND "
                            "public_key = ? AND status = 'submitted'",
                            (approval_id, sig_row["public_key"])).fetchone()[0]
            ok, reason = check()
            if ok and dup:
                ok, reason = False, "this key has already decided this request (reuse)"
            row = {**sig_row, "status": "submitted" if ok else "refused",
                   "note": "" if ok else reason}
            cols = ", ".join(row)
            c.execute(f"INSERT INTO signatures ({cols}) VALUES "  # noqa: S608 - fixed names
                      f"({', '.join('?' for _ in row)})", tuple(row.values()))
            new_state = PENDING
            if not ok:
                refused = reason
            elif sig_row["decision"] == "deny":
                new_state = "denied"
            else:
                n = c.execute("SELECT count(DISTINCT public_key) FROM signatures WHERE "
                              "approval_id = ? AND status = 'submitted' AND decision = "
                              "'approve'", (approval_id,)).fetchone()[0]
                if n >= threshold:
                    new_state = "approved"
            if new_state != PENDING:
                upd = c.execute("UPDATE approvals SET state = ?, decided_ns = ? WHERE id = ? "
                                "AND state = 'pending'", (new_state, now_ns, approval_id))
                if upd.rowcount != 1:  # pragma: no cover - guarded by the lock above
                    raise ClosedError("decided concurrently")
        if refused is not None:
            raise RefusedError(refused)
        return new_state


class ClosedError(Exception):
    pass


class RefusedError(Exception):
    pass


def tree_order(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """``(indent, row)`` with every run right under its parent (children in the order they
    started), for ``kernel runs``. A run whose parent is not in ``rows`` is shown at the top."""
    ids = {r["run_id"] for r in rows}
    kids: dict[str, list[dict[str, Any]]] = {}
    tops: list[dict[str, Any]] = []
    for r in rows:
        if r.get("parent") and r["parent"] in ids and r["parent"] != r["run_id"]:
            kids.setdefault(r["parent"], []).append(r)
        else:
            tops.append(r)
    out: list[tuple[int, dict[str, Any]]] = []
    seen: set[str] = set()

    def walk(r: dict[str, Any], indent: int) -> None:
        if r["run_id"] in seen:
            return
        seen.add(r["run_id"])
        out.append((indent, r))
        for k in kids.get(r["run_id"], []):
            walk(k, indent + 1)

    for r in tops:
        walk(r, 0)
    for r in rows:  # a loop of parents (only a hand-edited index has one): still listed
        walk(r, 0)
    return out


def loads(text: str | None) -> Any:
    return json.loads(text) if text else None
