"""The embedded amqtt broker enforces the accounts and topic table the production Mosquitto does.

Rule: no rule of its own. Passwords are checked against the accounts file `votebox device add`
writes (the same $7$ hashes Mosquitto reads), topics against broker/acl.py (the table
broker/mosquitto.acl is rendered from), client ids against `client_id_allowed`. amqtt loads
these from broker/embedded.py's config: ``plugins: {dotted.class.path: {accounts_file: ...}}``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from broker.accounts import Account, load_accounts, verify_mosquitto_hash
from broker.acl import Access, client_id_allowed, permitted
from processor.errors import ConfigError

__all__ = ["AccountsAuthPlugin", "AccountsTopicPlugin"]

log = logging.getLogger(__name__)


class _Accounts:
    """The accounts file, read again when it changes: `votebox device add` takes effect on the
    next CONNECT without a restart (Mosquitto needs a SIGHUP for the same). The topic plugin
    asks on every publish and every delivery, so the file is looked at once a second at most,
    not once a message."""

    _RECHECK_S = 1.0

    def __init__(self, path: Path) -> None:
        self._path = path
        self._seen: tuple[int, int] | None = None
        self._checked_at = time.monotonic()
        self._accounts = self._reload()

    def get(self, username: str) -> Account | None:
        now = time.monotonic()
        if now - self._checked_at >= self._RECHECK_S:
            self._checked_at = now
            try:
                self._accounts = self._reload()
            except (OSError, ConfigError) as exc:
                # Mid-rewrite or removed by mistake: keep the accounts that worked a moment ago.
                log.error("keeping the accounts read before: %s", exc)
        return self._accounts.get(username)

    def _reload(self) -> dict[str, Account]:
        stat = os.stat(self._path)
        if (stat.st_mtime_ns, stat.st_size) == self._seen:
            return self._accounts
        accounts = load_accounts(self._path)
        self._seen = (stat.st_mtime_ns, stat.st_size)
        return accounts


def _text(value: str | bytes | None) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class _ReadsAccounts:
    """Both plugins' config (``accounts_file``) and their view of it."""

    @dataclass
    class Config:
        accounts_file: str

    config: Config

    def __init__(self, context: Any) -> None:
        super().__init__(context)  # type: ignore[call-arg]  # the amqtt base plugin
        self._accounts = _Accounts(Path(self.config.accounts_file))


class AccountsAuthPlugin(_ReadsAccounts, BaseAuthPlugin):  # type: ignore[misc]  # no types
    """Lets in a client whose username and password match an account, under a client id its
    role may use (a device: its own id only)."""

    async def authenticate(self, *, session: Any) -> bool:
        username, password = _text(session.username), _text(session.password)
        account = self._accounts.get(username) if username else None
        if account is None or password is None:
            log.warning("refused %s: no such account %r", session.client_id, username)
            return False
        if not verify_mosquitto_hash(password, account.mosquitto):
            log.warning("refused %s: wrong password for %r", session.client_id, username)
            return False
        if session.will_flag and not permitted(
            account.role, account.username, "write", _text(session.will_topic) or ""
        ):
            # amqtt publishes a last will without asking the topic plugins: ask here.
            log.warning("refused %s: its last will's topic is not its to write", username)
            return False
        if not client_id_allowed(account.role, account.username, session.client_id or ""):
            log.warning(
                "refused %r: the %s account %r may not use that client id",
                session.client_id,
                account.role,
                username,
            )
            return False
        return True


class AccountsTopicPlugin(_ReadsAccounts, BaseTopicPlugin):  # type: ignore[misc]
    """Lets a client subscribe to, publish to and receive only what its role's grants cover."""

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        username = _text(session.username) if session is not None else None
        account = self._accounts.get(username) if username else None
        if account is None or not topic:
            return False
        access: Access = "write" if action == Action.PUBLISH else "read"
        allowed = permitted(account.role, account.username, access, topic)
        if not allowed and action != Action.RECEIVE:
            log.info("refused %s %s %s", username, action, topic)
        return allowed
