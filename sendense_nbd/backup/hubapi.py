"""The hub API client (``OMA_API_URL``): previous change IDs, progress, completion.

The contract is in ``docs/HUB_API.md``. Every call has a timeout;
progress is best effort, completion is retried and must succeed for the
job to count.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from sendense_nbd.backup.records import DiskResult, PreviousBackup
from sendense_nbd.errors import HubApiError

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


class HubApi:
    """Talks to the hub at ``base_url`` (``http://hub:8082``; a trailing ``/api/v1`` is accepted).

    An ``https://`` hub's certificate is checked with ``tls`` (a client context: its CA, maybe a client
    certificate), else the system's CAs; or, given ``tls_fingerprint`` (``sha256:HEX``), it must be that
    certificate.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        tls: ssl.SSLContext | None = None,
        tls_fingerprint: str | None = None,
    ) -> None:
        base = base_url.rstrip("/")
        self.base = base if base.endswith(API_PREFIX) else base + API_PREFIX
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.tls, self.tls_fingerprint = tls, tls_fingerprint
        self._session: Any = None

    def _client(self) -> Any:
        import aiohttp

        if self._session is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            checked: Any = self.tls if self.tls is not None else True
            if self.tls_fingerprint is not None:
                checked = aiohttp.Fingerprint(bytes.fromhex(self.tls_fingerprint.removeprefix("sha256:")))
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(ssl=checked),
            )
        return self._session

    async def _call(self, method: str, path: str, *, body: object = None, retries: int | None = None) -> Any:
        """JSON in, JSON out; connection failures and 5xx are retried, 4xx are not."""
        import aiohttp

        url = self.base + path
        attempts = (self.retries if retries is None else retries) + 1
        last: HubApiError | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                async with self._client().request(method, url, json=body) as response:
                    text = await response.text()
                    if response.status == 404 and method == "GET":
                        return None
                    if response.status >= 400:
                        last = HubApiError(f"{method} {url}: HTTP {response.status}: {text[:300]}", response.status)
                        if response.status < 500:
                            raise last
                        continue
                    if not text:
                        return {}
                    try:
                        return await response.json(content_type=None)
                    except ValueError as exc:
                        raise HubApiError(f"{method} {url}: the answer is not JSON: {text[:200]!r}") from exc
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                last = HubApiError(f"{method} {url}: the hub API did not answer: {exc or type(exc).__name__}")
        assert last is not None
        raise last

    async def previous(self, vm_path: str, disk_key: int) -> PreviousBackup | None:
        """The disk's last recorded change ID at the hub; None when the hub knows none."""
        answer = await self._call("GET", f"/backups/changeid?vm_path={quote(vm_path, safe='')}&disk_key={disk_key}")
        if not answer or not answer.get("change_id"):
            return None
        try:
            return PreviousBackup.from_json(answer)
        except ValueError as exc:
            raise HubApiError(f"the hub's change ID answer for {vm_path} disk {disk_key} is malformed: {exc}") from exc

    async def progress(self, job_id: str, report: dict[str, object]) -> None:
        """Post a progress report (one try: the next report supersedes it)."""
        await self._call("POST", f"/backups/{quote(job_id, safe='')}/progress", body=report, retries=0)

    async def complete(self, job_id: str, vm_path: str, disks: Sequence[DiskResult]) -> None:
        """Report the job completed, with every disk's new change ID (retried)."""
        body = {"status": "completed", "vm_path": vm_path, "disks": [d.to_json() for d in disks]}
        await self._call("POST", f"/backups/{quote(job_id, safe='')}/complete", body=body)

    async def failed(self, job_id: str, vm_path: str, stage: str, message: str) -> None:
        """Report the job failed at ``stage`` (retried)."""
        body = {"status": "failed", "vm_path": vm_path, "error": {"stage": stage, "message": message}}
        await self._call("POST", f"/backups/{quote(job_id, safe='')}/complete", body=body)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
