"""The hub's calls to a node (the VMware side), per docs/NODE_API.md."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from sendense_nbd import fields
from sendense_nbd.backup.records import Mode
from sendense_nbd.errors import BadRequest, NodeError, NodeNotFound, NodeUnavailable
from sendense_nbd.hub.requests import DiskSpec, parse_disks

log = logging.getLogger(__name__)

#: Most VMs the hub takes from a node's listing (the node lists at most 100000).
MAX_LISTED_VMS = 100_000
#: Malformed entries of one VM listing logged one by one (the rest only counted).
MAX_LOGGED_SKIPS = 5
#: Largest node answer read (a listing of 100000 VMs with long paths fits).
MAX_ANSWER = 64 << 20


class NodeClient:
    """The node's API over HTTP (one session, opened on first use); failures are :class:`NodeError`.

    ``on_answer`` is awaited after every call: with None when the node answered (a success, or 404),
    else with why not (no answer, a refusal, a 5xx), e.g. to record the node's health. No answer, or
    a 5xx, is :class:`NodeUnavailable`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        on_answer: Callable[[str | None], Awaitable[None]] | None = None,
    ) -> None:
        base = base_url.rstrip("/")
        self.base = base if base.endswith("/api/v1") else base + "/api/v1"
        self.token = token
        self.timeout = timeout
        self.on_answer = on_answer
        self._session: Any = None

    async def _call(self, method: str, path: str, body: object = None) -> Any:
        try:
            answer = await self._request(method, path, body)
        except NodeNotFound:
            await self._answered(None)
            raise
        except NodeError as exc:
            await self._answered(str(exc))
            raise
        await self._answered(None)
        return answer

    async def _answered(self, error: str | None) -> None:
        if self.on_answer is not None:
            await self.on_answer(error)

    async def _request(self, method: str, path: str, body: object) -> Any:
        import aiohttp

        if self._session is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout))
        url = self.base + path
        try:
            async with self._session.request(method, url, json=body) as response:
                raw = await _read_body(response.content)
                if len(raw) > MAX_ANSWER:
                    raise NodeError(f"{method} {url}: the answer is larger than {MAX_ANSWER} bytes")
                text = raw.decode("utf-8", "replace")
                if response.status == 404:
                    raise NodeNotFound(f"the node does not know it: {method} {url}: {text[:300]}")
                if response.status >= 400:
                    failed = NodeUnavailable if response.status >= 500 else NodeError
                    raise failed(f"{method} {url}: HTTP {response.status}: {text[:300]}")
                return json.loads(text) if text else {}
        except ValueError as exc:
            raise NodeError(f"{method} {url}: the answer is not JSON: {exc}") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise NodeUnavailable(f"{method} {url}: the node did not answer: {exc or type(exc).__name__}") from exc

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

    async def vms(self) -> list[str]:
        """The inventory paths of the node's VMs, checked: an entry without a valid path is skipped (and
        logged, the first :data:`MAX_LOGGED_SKIPS`), so one odd VM hides no other; :class:`NodeError` if
        the answer is no list of at most :data:`MAX_LISTED_VMS` VMs."""
        answer = await self._call("GET", "/vms")
        listed = answer.get("vms") if isinstance(answer, dict) else None
        if not isinstance(listed, list) or len(listed) > MAX_LISTED_VMS:
            raise NodeError(f"the node's VM list is malformed (a list of at most {MAX_LISTED_VMS} VMs expected)")
        paths, skipped = [], 0
        for item in listed:
            try:
                paths.append(fields.vm_path(item.get("path") if isinstance(item, dict) else item, "a VM path"))
            except BadRequest as exc:  # the node's entry is at fault: skip it, keep the others
                skipped += 1
                if skipped <= MAX_LOGGED_SKIPS:
                    log.warning("%s/vms: skipped entry %s: %s", self.base, str(item)[:200], exc)
        if skipped > MAX_LOGGED_SKIPS:
            log.warning("%s/vms: skipped %d malformed entries in all", self.base, skipped)
        return paths

    async def job(self, job_id: str) -> dict[str, Any]:
        """``GET /backups/{job}``: the node's record of a job; :class:`NodeNotFound` if it does not know it."""
        answer = await self._call("GET", f"/backups/{quote(job_id, safe='')}")
        if not isinstance(answer, dict):
            raise NodeError(f"the node's answer for job {job_id} is malformed: {str(answer)[:200]}")
        return answer

    async def health(self) -> dict[str, Any]:
        """``GET /health``: the node's version and load."""
        answer = await self._call("GET", "/health")
        if not isinstance(answer, dict):
            raise NodeError(f"the node's health answer is malformed: {str(answer)[:200]}")
        return answer

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


async def _read_body(content: Any) -> bytes:
    """The whole answer, or its first ``MAX_ANSWER + 1`` bytes (one ``read(n)`` returns only what has
    arrived, so a long listing is read in a loop)."""
    parts: list[bytes] = []
    size = 0
    while size <= MAX_ANSWER:
        chunk = await content.read(MAX_ANSWER + 1 - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)
