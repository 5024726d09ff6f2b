"""The hub's calls to a node (the VMware side), per docs/NODE_API.md."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from sendense_nbd.backup.records import Mode
from sendense_nbd.errors import BadRequest, NodeError, NodeNotFound
from sendense_nbd.hub.requests import DiskSpec, parse_disks


class NodeClient:
    """The node's API over HTTP (one session, opened on first use); failures are :class:`NodeError`."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        base = base_url.rstrip("/")
        self.base = base if base.endswith("/api/v1") else base + "/api/v1"
        self.token = token
        self.timeout = timeout
        self._session: Any = None

    async def _call(self, method: str, path: str, body: object = None) -> Any:
        import aiohttp

        if self._session is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout))
        url = self.base + path
        try:
            async with self._session.request(method, url, json=body) as response:
                text = await response.text()
                if response.status == 404:
                    raise NodeNotFound(f"the node does not know it: {method} {url}: {text[:300]}")
                if response.status >= 400:
                    raise NodeError(f"{method} {url}: HTTP {response.status}: {text[:300]}")
                return await response.json(content_type=None) if text else {}
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise NodeError(f"{method} {url}: the node did not answer: {exc or type(exc).__name__}") from exc

    async def disks(self, vm_path: str) -> tuple[DiskSpec, ...]:
        """The VM's disks as the node lists them, checked as a request's disks are (their other
        fields, such as ``label``, ignored); :class:`NodeError` if the list is malformed."""
        answer = await self._call("GET", f"/vms/disks?vm_path={quote(vm_path, safe='')}")
        listed = answer.get("disks") if isinstance(answer, dict) else None
        if not isinstance(listed, list):
            raise NodeError(f"the node's disk list for {vm_path} is malformed: {answer!r}")
        try:
            return parse_disks(
                [{"key": d.get("key"), "capacity": d.get("capacity")} if isinstance(d, dict) else d for d in listed],
                "the node's disk list",
            )
        except BadRequest as exc:  # the node's answer is at fault, not the hub's caller
            raise NodeError(f"the node's disk list for {vm_path} is malformed: {exc}") from exc

    async def start_backup(self, job_id: str, vm_path: str, mode: Mode, targets: dict[int, str], api_url: str) -> None:
        """Ask the node to back ``vm_path`` up into ``targets`` (disk key to NBD URI), reporting to ``api_url``."""
        body = {
            "job_id": job_id,
            "vm_path": vm_path,
            "mode": mode.value,
            "targets": {str(key): uri for key, uri in targets.items()},
            "api_url": api_url,
        }
        await self._call("POST", "/backups", body)

    async def cancel(self, job_id: str) -> None:
        """Ask the node to cancel a job."""
        await self._call("DELETE", f"/backups/{quote(job_id, safe='')}")

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
