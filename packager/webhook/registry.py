"""The MLflow registry as the webhook commands see it, through :mod:`packager.source`'s door.

Reconciliation's look-ups (:class:`MlflowRegistry`, a :class:`.reconcile.RegistryView`),
and the webhook's own registration and test (``packager webhook register`` / ``test``):
MLflow's client (``MlflowClient.create_webhook``, ``test_webhook``), reached after the
fail-fast probe, its errors translated into packager's. MLflow itself is imported only in
:mod:`packager.source`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from packager.errors import UsageError
from packager.redact import redact_uri
from packager.source import RegistryOptions, _check_reachable, _Resolver
from packager.webhook.reconcile import VersionView
from packager.webhook.rules import EVENTS

_PAGE = 1000


@dataclass(frozen=True, kw_only=True)
class Registered:
    webhook_id: str
    name: str
    url: str
    events: tuple[str, ...]
    registry_uri: str  # without credentials


@dataclass(frozen=True, kw_only=True)
class Tested:
    webhook_id: str
    success: bool
    status: int | None
    body: str | None
    error: str | None


class MlflowRegistry:
    """Registry look-ups through MLflow's client, for one tracking/registry server."""

    def __init__(self, options: RegistryOptions | None = None) -> None:
        options = options or RegistryOptions()
        tracking = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        if not tracking:
            raise UsageError(
                "no MLflow tracking server to talk to",
                hint="pass --tracking-uri or set MLFLOW_TRACKING_URI",
            )
        registry = options.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or tracking
        _check_reachable(tracking)
        if registry != tracking:
            _check_reachable(registry)
        self.registry_uri = registry
        self._resolver = _Resolver(tracking_uri=tracking, registry_uri=registry)

    @property
    def _client(self) -> Any:
        return self._resolver.client

    # reconciliation ---------------------------------------------------------------

    def model_names(self) -> Sequence[str]:
        names: list[str] = []
        token: str | None = None
        while True:

            def search(page_token: str | None = token) -> Any:
                return self._client.search_registered_models(
                    max_results=_PAGE, page_token=page_token
                )

            page = self._resolver._call(search, not_found=list)
            names += [str(model.name) for model in page]
            token = getattr(page, "token", None)
            if not token:
                return names

    def by_alias(self, name: str, alias: str) -> VersionView | None:
        found = self._resolver._call(
            lambda: self._client.get_model_version_by_alias(name, alias), not_found=lambda: None
        )
        return None if found is None else _view(found)

    def versions(self, name: str) -> Sequence[VersionView]:
        quoted = name.replace("'", "\\'")
        found = self._resolver._call(
            lambda: self._client.search_model_versions(f"name = '{quoted}'"), not_found=list
        )
        return [_view(version) for version in found]

    def version(self, name: str, version: str) -> VersionView | None:
        found = self._resolver._call(
            lambda: self._client.get_model_version(name, version), not_found=lambda: None
        )
        return None if found is None else _view(found)

    # the webhook itself -----------------------------------------------------------

    def create_webhook(
        self, *, name: str, url: str, events: Sequence[str], secret: str, description: str
    ) -> Registered:
        unknown = [event for event in events if event not in EVENTS]
        if unknown or not events:
            raise UsageError(
                f"--events: {', '.join(unknown) or 'none given'}: not an event packager acts on",
                hint=f"choose among {', '.join(EVENTS)}",
            )
        hook = self._resolver._call(
            lambda: self._client.create_webhook(
                name=name, url=url, events=list(events), description=description, secret=secret
            ),
            not_found=lambda: UsageError(f"{redact_uri(self.registry_uri)} has no webhook API"),
        )
        return Registered(
            webhook_id=str(hook.webhook_id),
            name=str(hook.name),
            url=str(hook.url),
            events=tuple(str(e) for e in hook.events),
            registry_uri=redact_uri(self.registry_uri),
        )

    def test_webhook(self, webhook_id: str, event: str | None = None) -> Tested:
        result = self._resolver._call(
            lambda: self._client.test_webhook(webhook_id, event),
            not_found=lambda: UsageError(
                f"there is no webhook {webhook_id} at {redact_uri(self.registry_uri)}",
                hint="`packager webhook register` prints the id of the webhook it creates",
            ),
        )
        return Tested(
            webhook_id=webhook_id,
            success=bool(result.success),
            status=result.response_status,
            body=result.response_body,
            error=result.error_message,
        )


def _view(version: Any) -> VersionView:
    return VersionView(
        name=str(version.name),
        version=str(version.version),
        tags={str(k): str(v) for k, v in (version.tags or {}).items()},
    )
