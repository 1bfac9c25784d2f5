"""The CONNECT password for SAS authentication, built with :mod:`dps_proto.sas` (not rewritten).

The session core decides *when* a fresh token is needed; signing happens here, with any
:class:`~dps_proto.sas.Signer` (a key in memory or in a TPM), at the transport's request.
"""

from __future__ import annotations

from dps_proto.errors import SasError
from dps_proto.sas import Signer, generate_sas_token, hub_resource_uri

from .errors import HubAuthError


def sas_password(
    host: str,
    device_id: str,
    signer: Signer,
    expiry: int,
    module_id: str | None = None,
    key_name: str | None = None,
) -> str:
    """``SharedAccessSignature sr={host}/devices/{id}[/modules/{m}]&sig=..&se={expiry}``.

    ``expiry`` is absolute (seconds since the Unix epoch): wall clock now + ``token_ttl``.
    :class:`HubAuthError` if the token cannot be built (e.g. a negative expiry).
    """
    try:
        return generate_sas_token(
            hub_resource_uri(host, device_id, module_id), signer, expiry, key_name
        )
    except SasError as exc:
        raise HubAuthError(f"cannot build a SAS token: {exc}") from exc
