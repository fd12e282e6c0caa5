"""POP login names: ``alice#phone`` is user ``alice`` on device ``phone``.

Each device keeps its own view of the mailbox (see ``gateway.maildrop.device_state``); a login
without a device name is the device ``DEFAULT_DEVICE``.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DEVICE = "default"


@dataclass(frozen=True, slots=True)
class Login:
    """A POP user name split into the upstream user and the device."""

    user: str
    device: str

    @classmethod
    def parse(cls, name: str, separator: str) -> Login:
        if separator and separator in name:
            user, _, device = name.rpartition(separator)
            if user and device:
                return cls(user, device)
        return cls(name, DEFAULT_DEVICE)
