"""nx-27017, the local MongoDB-wire server, with a dead client's open transaction rolled back.

nx-27017 (0.8.1) runs every transaction on the database's one SQLite connection (`BEGIN
IMMEDIATE`; a transaction that starts while another is open becomes a SAVEPOINT inside it) and
never ends a transaction whose client went away. So when a process is killed in the middle of
a transaction (the store writes each log batch in one), that transaction stays open for good,
and every later write of every client lands inside it, uncommitted: the next SIGKILL of
nx-27017 itself then loses all of them, sessions and events that were acknowledged long before
(seen in the fault suite: a store killed mid-batch, then nx-27017 killed, then "no session").
Real MongoDB aborts such a transaction by itself (transactionLifetimeLimitSeconds) and isolates
other clients' writes from it meanwhile.

This wrapper runs nx-27017's own `main` with two additions:
- the connection that started a transaction is remembered, and when that connection closes
  with the transaction still open, the transaction is rolled back at once. A client that dies
  kills its sockets with it, so the rollback comes within milliseconds. PyMongo runs each
  transaction's operations on one pooled connection that it keeps open, so a live client's
  transaction is never touched;
- a transaction does not start while another session's is open: its first operation gets a
  WriteConflict labelled TransientTransactionError (what MongoDB answers a transaction that
  collides with another), and the client retries. Nested, it would be a SAVEPOINT inside the
  other one, committed or rolled back with it. That lost acknowledged events (issue 23, the
  database away for 5 minutes): the store's write of a batch timed out while the server was
  slow, the store closed that connection and wrote the batch again in a new transaction,
  which ran inside the first one, found every event "already logged" (the first one's
  uncommitted inserts) and was acknowledged; then the server saw the first connection closed
  and rolled back both.
`make run` and the tests start nx-27017 through this module.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from nx_27017 import handler as nx_handler  # type: ignore[import-untyped]
from nx_27017.nx_27017 import main  # type: ignore[import-untyped]
from nx_27017.wire_protocol import _extract_session_id  # type: ignore[import-untyped]

log = logging.getLogger("devstack.nx_server")


def _command_of(msg: dict[str, Any]) -> dict[str, Any]:
    for section_type, section in msg.get("sections", ()):
        if section_type == "body" and isinstance(section, dict):
            return section
    return {}


# MongoDB's answer to a transaction that collides with another: retry the whole transaction.
WRITE_CONFLICT: dict[str, Any] = {
    "ok": 0,
    "errmsg": "another transaction is open (nx-27017 would nest this one in it): retry",
    "code": 112,
    "codeName": "WriteConflict",
    "errorLabels": ["TransientTransactionError"],
}


def _another_open(handler: Any, session_id: str) -> bool:
    """Whether a session other than `session_id` has a transaction open."""
    with handler._sessions_lock:
        return any(
            sid != session_id and session.in_transaction
            for (sid, _scope), session in handler._sessions.items()
        )


def patch(cls: Any = nx_handler.NeoSQLiteHandler) -> None:
    """Teach the handler to roll back the open transactions of a connection that closed."""
    if getattr(cls, "_canopy_patched", False):
        return
    lock = threading.Lock()
    starting = threading.Lock()  # a transaction's check for others and its start, as one
    started_on: dict[str, Any] = {}  # session id → the connection its transaction started on

    def remembering(original: Any) -> Any:
        def handle(self: Any, msg: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            command = _command_of(msg)
            session_id = None
            if command.get("startTransaction") and command.get("lsid"):
                session_id = _extract_session_id(command["lsid"])
            if not session_id:
                return original(self, msg, *args, **kwargs)
            # Checked and started under one lock: two transactions cannot both see none open.
            with starting:
                if _another_open(self, session_id):
                    return msg["request_id"], WRITE_CONFLICT
                with lock:
                    started_on[session_id] = msg.get("_conn_id")
                return original(self, msg, *args, **kwargs)

        return handle

    close = cls.close_streams_for_connection

    def close_streams_for_connection(self: Any, conn_id: Any) -> None:
        close(self, conn_id)
        if conn_id is None:
            return
        with lock:
            orphans = [sid for sid, conn in started_on.items() if conn == conn_id]
            for session_id in orphans:
                del started_on[session_id]
        for session_id in orphans:
            for session in self._tx_sessions(session_id):
                try:
                    session.abort_transaction()
                    log.warning("rolled back the open transaction of a closed connection")
                except Exception:
                    log.exception("could not roll back a closed connection's transaction")

    cls.handle_insert = remembering(cls.handle_insert)
    cls.handle_command = remembering(cls.handle_command)
    cls.close_streams_for_connection = close_streams_for_connection
    cls._canopy_patched = True


if __name__ == "__main__":
    patch()
    main()
