"""The privacy modes a run chooses with ``dp``: one object each, read by both sides.

Each mode says who adds the noise, who is trusted and what a run may publish, so the code asks a
mode what it does (``config.privacy.server_noise``) instead of listing mode names. The
mechanisms themselves live with the side that runs them: user-level DP-FedAvg on the server
(server_app/user_level_dp.py), DP-SGD and local DP on the client (client_app/dpsgd.py,
client_app/update_privacy.py); the guarantee each one states is in server_app/privacy.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrivacyMode:
    name: str
    level: str  # what a neighbouring dataset differs in: "" (no DP), "user", "sample" or "local"
    # User-level DP-FedAvg: the server samples clients secretly, adds Gaussian noise to the mean of
    # clipped updates and keeps the ledger; the server is the trusted curator.
    server_noise: bool = False
    client_clips: bool = False  # clients clip their own update; the server only checks the bound
    # The client trusts no one: it adds its own noise, keeps its own ledger and enforces its own policy.
    self_protecting: bool = False

    @property
    def private(self) -> bool:
        """Releases are covered by a DP guarantee: exact counts and per-client metrics are withheld."""
        return bool(self.level)


MODES: dict[str, PrivacyMode] = {
    mode.name: mode
    for mode in (
        PrivacyMode("none", ""),
        PrivacyMode("server", "user", server_noise=True),
        PrivacyMode("client", "user", server_noise=True, client_clips=True),
        PrivacyMode("dpsgd", "sample", self_protecting=True),
        PrivacyMode("local", "local", self_protecting=True),
    )
}
