"""The hub's web console: server-rendered pages at ``/``, next to the REST API at ``/api/v1``.

- :mod:`.app` adds it to the API's aiohttp application (one server, one port).
- :mod:`.auth`: the API's bearer token, exchanged at ``/login`` for an HttpOnly, SameSite=Strict
  session cookie; CSRF tokens on every change; a Content Security Policy of this origin only.
- One module per page (:mod:`.dashboard`, :mod:`.vms`, :mod:`.jobs`, :mod:`.policies`,
  :mod:`.nodes`); each calls the same :class:`~sendense_nbd.hub.service.Hub` methods the API
  calls and renders a Jinja2 template (``templates/``, autoescaped).
- :mod:`.render` (filters, errors as sentences) and :mod:`.charts` (SVG charts drawn here).
- ``static/``: the stylesheet, ``console.js`` (times in the browser's zone) and vendored htmx 2
  with its SSE extension (Zero-Clause BSD, ``static/THIRD-PARTY.txt``): no CDN, no build step.
"""
