"""The audit log: append-only (the database refuses UPDATE and DELETE), one entry per change,
written in the change's own transaction. Mixed into `store.ModelStore` (which provides `_db` and
`_clock`)."""

from __future__ import annotations

import json

from services.common.errors import InvalidArgument
from services.registry import version_rows
from services.registry.database import Connection
from services.registry.records import AuditEntry, validate_audit_action, validate_model_name


class AuditLog:
    # -- audit ----------------------------------------------------------------------------

    def append_audit(
        self, action: str, model_name: str = "", version: int = 0, details: dict | None = None,
        actor: str = "local",
    ) -> AuditEntry:
        """An entry for what happened outside the store (gate results, rollbacks)."""
        validate_audit_action(action)
        details = checked_details(details)
        if version and not model_name:
            raise InvalidArgument("an audit entry that names a version must name its model")

        def work(conn: Connection) -> AuditEntry:
            if model_name:
                validate_model_name(model_name)
                version_rows.require_model(conn, model_name)
            return self._audit(conn, actor, action, model_name, version, details)

        return self._db.run(work, write=True)

    def list_audit(self, model_name: str = "", after_sequence: int = 0, limit: int = 0) -> list[AuditEntry]:
        if model_name:
            validate_model_name(model_name)
        if after_sequence < 0 or limit < 0:
            raise InvalidArgument("after_sequence and limit must be >= 0")
        return self._db.run(
            lambda conn: version_rows.audit_entries(conn, model_name, after_sequence, limit), write=False
        )

    def _audit(
        self, conn: Connection, actor: str, action: str, model_name: str, version: int, details: dict
    ) -> AuditEntry:
        conn.lock_audit()
        at_s = self._clock()
        details_json = json.dumps(details, sort_keys=True, separators=(",", ":"))
        rows = conn.execute(
            "INSERT INTO audit (at_s, actor, action, model_name, version, details_json) "
            "VALUES (?, ?, ?, ?, ?, ?) RETURNING sequence",
            (at_s, actor, action, model_name, version, details_json),
        )
        return AuditEntry(rows[0][0], at_s, actor, action, model_name, version, details)


def checked_details(details: object, what: str = "audit details") -> dict:
    if details is None:
        return {}
    if not isinstance(details, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(details).__name__}")
    try:
        json.dumps(details, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"{what} are not JSON-serializable: {error}") from None
    return details
