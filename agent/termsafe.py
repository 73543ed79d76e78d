"""Text from users or Chronicle (asset types, component names, run ids, error messages) made
safe for a terminal: every control character (C0, DEL, C1 — so every escape sequence) and
every other non-printable character (bidirectional overrides, ...) is shown as a visible
escape (``\\x1b``, ``\\r``, ``\\u202e``) instead of being sent to the terminal. The CLI's human
output goes through :func:`visible` (``Ctx.print``/``Ctx.warn``, the jobs table, progress
lines); ``--json`` output is JSON-escaped instead."""

from __future__ import annotations

_NAMED = {"\t": "\\t", "\r": "\\r", "\n": "\\n"}


def _escape(ch: str) -> str:
    n = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def visible(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` with every non-printable character escaped; with ``keep_newlines``, line
    breaks ("\\n") are kept (multi-line output the CLI composed itself)."""
    s = str(text)
    if s.isprintable():
        return s
    if keep_newlines:
        return "\n".join(visible(line) for line in s.split("\n"))
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in s)
