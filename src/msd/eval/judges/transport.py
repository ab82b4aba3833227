"""HTTP for judges that call an endpoint: one POST with a total deadline, standard library only.

    ep = Endpoint("http://user:pw@host:8000/v1?api-version=2", "/chat/completions")
    status, content_type, body = ep.post(b"{...}", api_key, timeout=60, stop=event)

- The deadline covers the whole request, reading the reply included: a watchdog closes the
  socket when it passes, so a server that trickles one byte at a time cannot hold a worker.
  (urllib's timeout applies to each socket read, not to the request.)
- `stop` (a threading.Event) closes the connection too, so Ctrl-C ends within a moment.
- user:password@ in the URL is sent as HTTP basic auth (unless an API key is set, which is
  sent as a bearer token); it is never shown. A query string stays after the path
  (`/v1/chat/completions?api-version=2`); its values are not shown either.
"""

from __future__ import annotations

import base64
import http.client
import socket
import threading
import time
from urllib.parse import parse_qsl, unquote, urlsplit

from msd.errors import MsdError

MAX_REPLY_BYTES = 8 * 2**20


class Failure(Exception):
    """A request that failed in a way worth another try (network, timeout, cut-off reply)."""


class Endpoint:
    def __init__(self, base_url: str, suffix: str):
        parts = urlsplit(base_url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MsdError("expected an http:// or https:// URL", "--judge-base-url")
        path = parts.path.rstrip("/")
        if not path.endswith(suffix):
            path += suffix
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.target = path + (f"?{parts.query}" if parts.query else "")
        self.basic = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.basic = "Basic " + base64.b64encode(pair.encode()).decode()
        shown_query = "&".join(f"{k}=..." for k, _ in parse_qsl(parts.query, keep_blank_values=True))
        netloc = self.host + (f":{self.port}" if self.port else "")
        self.public_url = f"{self.scheme}://{netloc}{path}" + (f"?{shown_query}" if shown_query else "")

    def post(self, body: bytes, api_key: str | None, timeout: float,
             stop: threading.Event) -> tuple[int, str, bytes]:
        """(status, content type, body) of one POST, or Failure; never longer than `timeout`."""
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=timeout)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        elif self.basic:
            headers["Authorization"] = self.basic
        expired, done = threading.Event(), threading.Event()
        guard = threading.Thread(target=_watch, args=(done, stop, expired, conn, timeout), daemon=True)
        guard.start()
        deadline = time.monotonic() + timeout
        try:
            conn.request("POST", self.target, body=body, headers=headers)
            resp = conn.getresponse()
            chunks, size = [], 0
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_REPLY_BYTES:
                    raise Failure(f"reply larger than {MAX_REPLY_BYTES // 2**20} MiB")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    expired.set()
                    break
            if expired.is_set() or stop.is_set():
                raise Failure(f"no complete reply within {timeout:g} s")
            return resp.status, resp.getheader("Content-Type") or "", b"".join(chunks)
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set() or stop.is_set():
                raise Failure(f"no complete reply within {timeout:g} s") from None
            raise Failure(f"{type(e).__name__}: {e}") from None
        finally:
            done.set()
            conn.close()


def _watch(done: threading.Event, stop: threading.Event, expired: threading.Event, conn,
           timeout: float) -> None:
    """Close the connection when the deadline passes or `stop` is set, whichever comes first."""
    end = time.monotonic() + timeout
    while not done.is_set():
        if stop.is_set() or time.monotonic() >= end:
            if not stop.is_set():
                expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return
        done.wait(min(0.2, max(0.0, end - time.monotonic())))


KEY_CHARACTERS = {"\n": "a newline", "\r": "a carriage return", " ": "a space", "\t": "a tab"}


def checked_key(key: str | None, env: str) -> str | None:
    """An API key that an HTTP header can carry (visible ASCII), or one line naming the variable
    and what is wrong, never the key. Fixed bug: a key with a newline crashed with a traceback
    that printed the whole key; one with a non-Latin-1 character crashed too."""
    if not key:
        return None
    bad = next((i for i, c in enumerate(key) if not "\x21" <= c <= "\x7e"), None)
    if bad is not None:
        what = KEY_CHARACTERS.get(key[bad], "a character other than printable ASCII")
        raise MsdError(f"the API key holds {what} (character {bad + 1}), which an HTTP header cannot "
                       "carry; set the variable again without it", f"${env}")
    return key


def looks_like_html(content_type: str, body: bytes) -> bool:
    return "html" in content_type.lower() or body.lstrip()[:1] == b"<"
