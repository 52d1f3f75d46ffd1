"""Broker accounts: one JSON file is the source of truth, the Mosquitto password file is written
from it. Rule: passwords are never stored, only hashes; a generated password is shown once.

The roles are those of broker/acl.py: a device's username is its device id; the
`processor` and `dashboard` roles have accounts of their own names.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from broker.acl import ROLES, Role, render_mosquitto_acl
from processor.errors import ConfigError
from processor.topics import NON_DEVICE_ACCOUNTS, RESERVED_PREFIX, is_valid_id

__all__ = [
    "Account",
    "AccountStore",
    "load_accounts",
    "mosquitto_hash",
    "verify_mosquitto_hash",
]

# Mosquitto 2's own format ($7$: PBKDF2-SHA512), as mosquitto_passwd writes it.
_ITERATIONS: Final = 101
_SALT_BYTES: Final = 12


def mosquitto_hash(password: str, *, salt: bytes | None = None) -> str:
    """A password hash Mosquitto 2 accepts in its password_file."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS, dklen=64)
    return f"$7${_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_mosquitto_hash(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash."""
    _, kind, iterations, salt, digest = hashed.split("$")
    if kind != "7":
        return False
    got = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), base64.b64decode(salt), int(iterations), dklen=64
    )
    return secrets.compare_digest(got, base64.b64decode(digest))


@dataclass(frozen=True, slots=True)
class Account:
    """One broker login."""

    username: str
    role: Role
    mosquitto: str  # the $7$ hash

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)} (got {self.role!r})")
        if self.role == "device":
            if not is_valid_id(self.username):
                raise ConfigError(
                    f"device id {self.username!r} must be 1-64 chars of A-Z a-z 0-9 _ -"
                )
            if self.username in NON_DEVICE_ACCOUNTS:
                raise ConfigError(f"{self.username!r} is an account of its own, not a device id")
            if self.username.startswith(RESERVED_PREFIX):
                raise ConfigError(
                    f"device ids may not start with {RESERVED_PREFIX!r}: votebox's own programs"
                    " connect with such client ids (docs/security.md)"
                )
        elif self.username != self.role:
            raise ConfigError(f"the {self.role} account is named {self.role!r}")


class AccountStore:
    """The accounts file, and the Mosquitto password file and ACL written from it.

    Args:
        path: the JSON source of truth.
        passwd_path: the password file Mosquitto reads (rewritten on every change).
        acl_path: the ACL file Mosquitto reads, rendered from broker/acl.py on every change
            (so a deployment's ACL follows the table of the votebox that provisions it); None
            to leave it alone.
    """

    def __init__(self, path: Path, passwd_path: Path, acl_path: Path | None = None) -> None:
        self.path = path
        self.passwd_path = passwd_path
        self.acl_path = acl_path

    def load(self) -> dict[str, Account]:
        """Every account, by username (none when the file does not exist yet).

        Raises:
            ConfigError: the file is not an accounts file.
        """
        return load_accounts(self.path) if self.path.exists() else {}

    def add(self, username: str, role: Role, password: str | None = None) -> str:
        """Add or replace an account; returns its password (generated when not given).

        Raises:
            ConfigError: an invalid name or role.
        """
        return self.add_all({username: (role, password)})[username]

    def add_all(self, wanted: Mapping[str, tuple[Role, str | None]]) -> dict[str, str]:
        """Add or replace many accounts in one write; returns their passwords by username
        (generated where None is given).

        Raises:
            ConfigError: an invalid name or role.
        """
        passwords = {name: pw or secrets.token_urlsafe(18) for name, (_, pw) in wanted.items()}
        added = {
            name: Account(name, role, mosquitto_hash(passwords[name]))
            for name, (role, _) in wanted.items()
        }
        with self._locked():
            self._save(self.load() | added)
        return passwords

    def remove(self, username: str) -> None:
        """Remove an account.

        Raises:
            ConfigError: there is no such account.
        """
        with self._locked():
            accounts = self.load()
            if username not in accounts:
                raise ConfigError(f"no account {username!r}; votebox device list shows them")
            del accounts[username]
            self._save(accounts)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the accounts file's lock for a read-change-write: provisioning scripts run
        adds in parallel, and two unlocked ones each write what they read, losing the other's
        account (and the password file can end up holding a different set)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _save(self, accounts: dict[str, Account]) -> None:
        body = {
            "accounts": {
                name: {"role": accounts[name].role, "mosquitto": accounts[name].mosquitto}
                for name in sorted(accounts)
            }
        }
        _write_private(self.path, json.dumps(body, indent=2) + "\n")
        _write_private(
            self.passwd_path,
            "".join(f"{name}:{accounts[name].mosquitto}\n" for name in sorted(accounts)),
        )
        if self.acl_path is not None:
            _write_private(self.acl_path, render_mosquitto_acl(), mode=0o644)


def load_accounts(path: Path) -> dict[str, Account]:
    """Every account in an accounts file, by username.

    Raises:
        ConfigError: the file is not an accounts file.
        FileNotFoundError: there is no file.
    """
    try:
        raw = json.loads(path.read_text())
        return {
            name: Account(name, entry["role"], entry["mosquitto"])
            for name, entry in raw["accounts"].items()
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a votebox accounts file ({exc})") from None


def _write_private(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Write atomically (a broker reading it mid-write sees the old or the new file), private
    unless ``mode`` says otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: a writer that is not under the lock (a hand-run tool) cannot rename
    # this one's half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
