"""Where ODP requests go: the regions' base URLs and the endpoint paths of ODP's Twilio Segment app.

Contract: ``odp-destination.md`` section 1. The one definition of each: the client, the audience
sync, the real-time actions, the emulator and the configuration's check of ``odp.region`` read them
from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = [
    "AUTH",
    "BASE_PATH",
    "BATCH_CUSTOM_EVENT",
    "BATCH_EMAIL_EVENT",
    "BATCH_ENDPOINTS",
    "BATCH_SYNC_AUDIENCE",
    "BATCH_UPSERT_CONTACT",
    "REGIONS",
    "base_url",
]

BASE_PATH: Final = "/twilio_segment"
"""The path of the Segment app's API under an ODP host (also the emulator's)."""

REGIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "US": "https://function.zaius.app" + BASE_PATH,
        "EU": "https://function.eu1.ocp.optimizely.com" + BASE_PATH,
        "AU": "https://function.au1.ocp.optimizely.com" + BASE_PATH,
    }
)
"""``odp.region`` -> the base URL every path below is appended to."""

AUTH: Final = "/auth"
BATCH_UPSERT_CONTACT: Final = "/batch_upsert_contact"
BATCH_EMAIL_EVENT: Final = "/batch_email_event"
BATCH_CUSTOM_EVENT: Final = "/batch_custom_event"
BATCH_SYNC_AUDIENCE: Final = "/batch_sync_audience"
BATCH_ENDPOINTS: Final = (BATCH_UPSERT_CONTACT, BATCH_EMAIL_EVENT, BATCH_CUSTOM_EVENT, BATCH_SYNC_AUDIENCE)


def base_url(region: str, endpoint: str | None = None) -> str:
    """The ODP base URL of ``region``, or ``endpoint`` (emulator, proxy) when one is configured.

    The region is checked even with an endpoint: any region other than US, EU, AU is a config error.
    """
    if region not in REGIONS:
        raise ValueError(f"must be one of {', '.join(REGIONS)}")
    if endpoint:
        return endpoint.rstrip("/")
    return REGIONS[region]
