"""The local Chronicle-compatible server: the wire contract of ``chronicle-api.md`` over
SQLite metadata and a disk (or S3) store, so the agent works on a machine with nothing else.

It shares nothing with the rest of the agent but the wire contract and ``agent.config`` /
``agent.errors``.

::

    from agent.server.runner import serve_forever, start_server

    server = await start_server(settings, embedded=True)   # the daemon
    ...                                                     # server.url, server.tokens_file
    await server.stop()

    serve_forever(settings)                                 # chronicle-agent server

(The package itself imports nothing: its modules import one another through it, so an
import here would make a cycle.)
"""
