"""The socket API's OpenAPI document is generated over its route table: every route served
is documented, and nothing else is."""

from __future__ import annotations


def test_every_socket_api_route_is_documented() -> None:
    """The daemon's own route table against the document generated over it: a route added
    without an entry in agent/api/openapi.py fails here."""
    from aiohttp import web

    from agent.api.app import ROUTES
    from agent.api.openapi import document

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    for method, path, _ in ROUTES:
        app.router.add_route(method, path, handler)
    served = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD"}
    documented = {(m.upper(), p) for p, ops in document(app.router)["paths"].items()
                  for m in ops}
    assert served == documented, sorted(served ^ documented)
    assert len(served) >= 20
