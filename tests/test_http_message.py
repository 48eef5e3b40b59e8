"""
The HTTP proxy's wire, sans-IO: targets, credentials and header rewriting
(`ssx.wire.http_message`), and h11 on both sides (`ssx.wire.http_codec`): heads,
limits, Content-Length, body framing, and fuzzing of all of it.
"""

from __future__ import annotations

import base64

import h11
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from ssx.wire.http_codec import MAX_HEAD, ClientSide, Data, EndOfMessage, InformationalResponse, OriginSide, Request, Response
from ssx.wire.http_message import (
    HttpError,
    absolute_target,
    basic_credentials_ok,
    connect_target,
    end_to_end,
    error_response,
    origin_headers,
    response_head,
    supply_host,
)

_settings = settings(max_examples=200, deadline=None, database=None)


def read_request(data: bytes) -> tuple[Request, list]:
    """The request head and the rest of the events that `data` gives a ClientSide."""
    side = ClientSide()
    side.receive(data)
    head = side.next_event()
    assert isinstance(head, Request), head
    events = []
    while (event := side.next_event()) is not None:
        events.append(event)
    return head, events


def refused(side_feed, data: bytes) -> int:
    """The status of the HttpError that `data` causes."""
    try:
        side_feed(data)
    except HttpError as e:
        return e.status
    raise AssertionError(f"{data[:60]!r} was accepted")


def client_events(data: bytes) -> list:
    side = ClientSide()
    side.receive(data)
    events = []
    while (event := side.next_event()) is not None:
        events.append(event)
    return events


def origin_after(method: bytes = b"GET") -> OriginSide:
    """An OriginSide that sent a request and waits for the response."""
    origin = OriginSide()
    request, _ = read_request(method + b" http://h/ HTTP/1.1\r\nHost: h\r\n\r\n")
    origin.request(request, "h", 80, "/", close=False)
    origin.send_end([])
    return origin


def origin_events(data: bytes, method: bytes = b"GET", eof: bool = False) -> list:
    origin = origin_after(method)
    origin.receive(data)
    if eof:
        origin.receive(b"")
    events = []
    while (event := origin.next_event()) is not None:
        events.append(event)
    return events


class TargetTests(unittest.SynchronousTestCase):
    """Where a request goes."""

    def test_targets(self):
        """Absolute-form targets give host, port (80 by default) and origin-form path; CONNECT gives host and port."""
        self.assertEqual(absolute_target("http://example.org/a/b?c=d#frag"), ("example.org", 80, "/a/b?c=d"))
        self.assertEqual(absolute_target("http://[2001:db8::1]:8080"), ("2001:db8::1", 8080, "/"))
        self.assertEqual(absolute_target("HTTP://h:81?q"), ("h", 81, "/?q"))
        self.assertEqual(connect_target("example.org:443"), ("example.org", 443))
        self.assertEqual(connect_target("[::1]:22"), ("::1", 22))
        for bad in ("/just/a/path", "https://example.org/", "http://u:p@h/", "http://h:0/", "http://h:99999/", "http:///x"):
            with self.assertRaises(HttpError, msg=bad):
                absolute_target(bad)
        for bad in ("example.org", "[::1", "h:0"):
            with self.assertRaises(HttpError, msg=bad):
                connect_target(bad)

    def test_port_ascii_digits_only(self):
        """A port of non-ASCII digits (which str.isdigit() accepts and int() may not) is HttpError 400."""
        for bad in ("http://h:\u00b2/", "http://h:\u0661\u0662/", "http://h:+80/", "http://h: 80/", "http://h:" + "9" * 5000):
            with self.assertRaises(HttpError, msg=bad[:20]) as caught:
                absolute_target(bad)
            self.assertEqual(caught.exception.status, 400)

    @_settings
    @given(st.from_regex(r"[ -~]{0,80}", fullmatch=True))
    def test_target_fuzz(self, target):
        """Arbitrary printable targets give a valid host, port and path, or HttpError 400."""
        try:
            host, port, path = absolute_target("http://" + target)
        except HttpError as e:
            self.assertEqual(e.status, 400)
            return
        self.assertTrue(host and 0 < port < 65536 and path.startswith("/"))


class RewriteTests(unittest.SynchronousTestCase):
    """What the origin and the application get."""

    def test_origin_request(self):
        """Origin-form target, Host from the URL first, hop-by-hop headers (and those Connection names) removed, others kept in order."""
        request, _ = read_request(
            b"GET http://example.org:8080/p?q HTTP/1.1\r\nHost: wrong.example\r\nProxy-Authorization: Basic eDp5\r\n"
            b"Proxy-Connection: keep-alive\r\nConnection: X-Private, keep-alive\r\nKeep-Alive: 300\r\nX-Private: 1\r\n"
            b"TE: trailers\r\nUpgrade: h2c\r\nAccept: */*\r\nTransfer-Encoding: chunked\r\nCookie: a=b\r\n\r\n"
        )
        self.assertEqual(
            OriginSide().request(request, "example.org", 8080, "/p?q", close=False),
            b"GET /p?q HTTP/1.1\r\nHost: example.org:8080\r\nAccept: */*\r\nTransfer-Encoding: chunked\r\n"
            b"Cookie: a=b\r\n\r\n",
        )

    def test_origin_request_close(self):
        """A client that will close has Connection: close passed on; close and HTTP/1.0 without keep-alive say so, Proxy-Connection too."""
        for head, closing in (
            (b"GET http://h/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", True),
            (b"GET http://h/ HTTP/1.1\r\nHost: h\r\nProxy-Connection: close\r\n\r\n", True),
            (b"GET http://h/ HTTP/1.0\r\n\r\n", True),
            (b"GET http://h/ HTTP/1.0\r\nProxy-Connection: Keep-Alive\r\n\r\n", False),
            (b"GET http://h/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False),
            (b"GET http://h/ HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", True),
            (b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n", False),
        ):
            side = ClientSide()
            side.receive(head)
            request = side.next_event()
            self.assertEqual(side.closing, closing, head)
        self.assertEqual(
            OriginSide().request(request, "h", 80, "/", close=True), b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )

    def test_end_to_end(self):
        """Hop-by-hop response headers, and those that Connection names, are dropped; the rest keep order and case."""
        headers = [(b"Connection", b"close, X-Hop"), (b"Keep-Alive", b"5"), (b"X-Hop", b"1"), (b"Content-Length", b"2"),
                   (b"Set-Cookie", b"a"), (b"set-cookie", b"b")]
        self.assertEqual(end_to_end(headers), [(b"Content-Length", b"2"), (b"Set-Cookie", b"a"), (b"set-cookie", b"b")])
        self.assertEqual(origin_headers([(b"HOST", b"x"), (b"A", b"1")], "::1", 81, True),
                         [(b"Host", b"[::1]:81"), (b"A", b"1"), (b"Connection", b"close")])

    def test_basic_credentials(self):
        """Basic credentials match only when both halves do; other schemes and bad base64 do not."""
        token = base64.b64encode(b"alice:s3:cret")
        good = [(b"Proxy-Authorization", b"Basic " + token)]
        self.assertTrue(basic_credentials_ok(good, (b"alice", b"s3:cret")))
        self.assertFalse(basic_credentials_ok(good, (b"alice", b"s3")))
        for value in (b"Bearer x", b"Basic !!!", b"Basic " + base64.b64encode(b"alice"), b""):
            self.assertFalse(basic_credentials_ok([(b"proxy-authorization", value)], (b"alice", b"s3:cret")), value)
        self.assertFalse(basic_credentials_ok([], (b"alice", b"s3:cret")))

    def test_error_response(self):
        """The proxy's own answers are complete responses that close."""
        response = error_response(407, "credentials", (("Proxy-Authenticate", 'Basic realm="ssx"'),))
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]))
        client.receive_data(response)
        head = client.next_event()
        body = client.next_event()
        self.assertEqual(head.status_code, 407)
        self.assertIn((b"connection", b"close"), list(head.headers))
        self.assertEqual(int(dict(head.headers)[b"content-length"]), len(body.data))
        self.assertIsInstance(client.next_event(), h11.EndOfMessage)


class ClientSideTests(unittest.SynchronousTestCase):
    """Requests as the application sends them."""

    def test_request(self):
        """Method, target, version and headers (order and case kept) are read, then the body."""
        request, events = read_request(
            b"POST http://example.org/x?y=1 HTTP/1.1\r\nHost: example.org\r\nContent-Length: 3\r\nX-A:  b \r\n\r\nabc"
        )
        self.assertEqual((request.method, request.target, request.http_version),
                         (b"POST", b"http://example.org/x?y=1", b"1.1"))
        self.assertIn((b"X-A", b"b"), request.headers.raw_items())
        self.assertEqual([type(e) for e in events], [Data, EndOfMessage])
        self.assertEqual(events[0].data, b"abc")

    def test_malformed_requests(self):
        """Malformed request lines and headers are 400; smuggling-prone framing is 400 or 501; an origin-form 1.1 request without Host is 400."""
        cases = [
            (b"GET http://a/ HTTP/2.0\r\nHost: a\r\n\r\n", 400),
            (b"GET  http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET http://a/\r\n\r\n", 400),
            (b"G(T http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400),
            (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400),
            (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
            (b"GET /a HTTP/1.1\r\n\r\n", 400),
            (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", 400),
            (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nHost: b:443\r\n\r\n", 400),
            (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            (b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
            (b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n", 400),
            (b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (b"\x16\x03\x01\x02\x00", 400),
        ]
        for data, status in cases:
            self.assertEqual(refused(client_events, data), status, data)

    def test_folded_header_unfolded(self):
        """An obsolete folded header line is joined with a space before it goes on (RFC 9112 §5.2)."""
        request, _ = read_request(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n")
        self.assertIn((b"X", b"a folded"), request.headers.raw_items())

    def test_content_length_ascii_digits(self):
        """Content-Length must be at most 20 ASCII digits: superscripts, other scripts' digits and huge values are 400."""
        for value in ("\u00b2", "\u0661", "\uff15", "9" * 5000, "9" * 4000, "9" * 21, "+5", "5 5", "0x5", ""):
            data = f"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: {value}\r\n\r\n".encode()
            self.assertEqual(refused(client_events, data), 400, value[:10])
        _, events = read_request(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"0" * 20 + b"\r\n\r\n")
        self.assertEqual([type(e) for e in events], [EndOfMessage])

    def test_content_length_int_limit(self):
        """Where h11 would let int()'s ValueError out (as before 0.15, simulated here), the codec still raises HttpError 400 or 502."""
        import h11._headers as headers_module  # private: the digit cap that h11 0.15 added

        self.assertTrue(hasattr(headers_module, "CONTENT_LENGTH_MAX_DIGITS"), "h11 moved CONTENT_LENGTH_MAX_DIGITS")
        self.patch(headers_module, "CONTENT_LENGTH_MAX_DIGITS", 10**6)
        huge = b"Content-Length: " + b"9" * 5000 + b"\r\n"
        raw = h11.Connection(h11.SERVER)
        raw.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\n" + huge + b"\r\n")
        self.assertRaises(ValueError, raw.next_event)  # what h11 itself does then
        self.assertEqual(refused(client_events, b"POST http://a/ HTTP/1.1\r\nHost: a\r\n" + huge + b"\r\n"), 400)
        self.assertEqual(refused(origin_events, b"HTTP/1.1 200 OK\r\n" + huge + b"\r\n"), 502)

    def test_head_limit(self):
        """An incomplete head over 64 KiB is 431, whether it arrives at once or a byte at a time."""
        big = b"GET http://h/ HTTP/1.1\r\nHost: h\r\nX: " + b"a" * MAX_HEAD
        self.assertEqual(refused(client_events, big), 431)
        side = ClientSide()
        with self.assertRaises(HttpError) as caught:
            for i in range(len(big)):
                side.receive(big[i : i + 1])
                side.next_event()
        self.assertEqual(caught.exception.status, 431)
        self.assertEqual(i, MAX_HEAD, "refused at the first byte past 64 KiB")

    def test_pipelined_requests_held(self):
        """A request read to its end stops the reading; what follows is held until next_request, then read."""
        side = ClientSide()
        side.receive(b"GET http://a/1 HTTP/1.0\r\n\r\nGET http://a/2 HTTP/1.1\r\n")
        self.assertIsInstance(side.next_event(), Request)
        self.assertIsInstance(side.next_event(), EndOfMessage)
        side.receive(b"Host: a\r\n\r\n")
        self.assertIsNone(side.next_event())
        self.assertTrue(side.request_complete)
        self.assertEqual(side.held, 11)
        self.assertEqual(side.rest(), b"GET http://a/2 HTTP/1.1\r\nHost: a\r\n\r\n")
        side.respond(Response(status_code=200, headers=[("Content-Length", "0")]))
        side.respond_end([])
        self.assertFalse(side.next_request(), "an HTTP/1.0 connection goes on")

    def test_keep_alive_cycle(self):
        """After a response's end the next request of a keep-alive connection is read."""
        side = ClientSide()
        side.receive(b"GET http://a/1 HTTP/1.1\r\nHost: a\r\n\r\nGET http://a/2 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(side.next_event().target, b"http://a/1")
        side.next_event()
        self.assertIsNone(side.next_event())
        out = side.respond(Response(status_code=204, reason=b"No Content", headers=[])) + side.respond_end([])
        self.assertEqual(out, b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertTrue(side.next_request())
        self.assertEqual(side.next_event().target, b"http://a/2")

    def test_early_response_closes(self):
        """A response sent before the request body was read ends the connection."""
        side = ClientSide()
        side.receive(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234")
        side.next_event()
        side.next_event()
        out = side.respond(Response(status_code=413, headers=[("Content-Length", "0")]), close=True) + side.respond_end([])
        self.assertEqual(out, b"HTTP/1.1 413 \r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.assertFalse(side.next_request())

    def test_connect_rest(self):
        """After a CONNECT head, every byte that followed is the tunnel's."""
        side = ClientSide()
        side.receive(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01")
        self.assertEqual(side.next_event().method, b"CONNECT")
        self.assertEqual(side.rest(), b"\x16\x03\x01")


class MissingHostTests(unittest.SynchronousTestCase):
    """A proxy request names its host in the request line; Host may be left out there."""

    def test_supply_host(self):
        """HTTP/1.1 CONNECT and absolute-form heads without Host get one from the target; others stay as they are."""
        cases = [
            (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
            (b"GET http://example.com:8080/x?y HTTP/1.1\r\nAccept: */*\r\n\r\n",
             b"GET http://example.com:8080/x?y HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\n\r\n"),
            (b"GET http://[::1]?q HTTP/1.1\n\n", b"GET http://[::1]?q HTTP/1.1\nHost: [::1]\r\n\n"),
            (b"GET http://a#f HTTP/1.1\r\nX-Host: b\r\n\r\n", b"GET http://a#f HTTP/1.1\r\nHost: a\r\nX-Host: b\r\n\r\n"),
        ]
        for head, supplied in cases:
            self.assertEqual(supply_host(head), supplied, head)
        for head in (
            b"GET http://a/ HTTP/1.1\r\nhOsT: b\r\n\r\n",  # has one (the origin gets Host from the target anyway)
            b"CONNECT a:443 HTTP/1.1\r\nX: 1\r\nHost: a:443\r\n\r\n",
            b"GET /a HTTP/1.1\r\n\r\n",  # origin form: not a proxy request
            b"GET * HTTP/1.1\r\n\r\n",
            b"GET http://a/ HTTP/1.0\r\n\r\n",  # HTTP/1.0 needs none
            b"GET  http://a/ HTTP/1.1\r\n\r\n",  # not a request line: h11 says so
        ):
            self.assertIs(supply_host(head), head, head)

    def test_requests_without_host(self):
        """CONNECT and absolute-form requests without Host are read, however they are split; the origin gets Host from the URL."""
        connect = b"CONNECT example.com:443 HTTP/1.1\r\nUser-Agent: t\r\n\r\n\x16\x03\x01"
        get = b"\r\nGET http://example.com:8080/p HTTP/1.1\r\nAccept: */*\r\n\r\n"
        for data in (connect, get):
            for size in (1, 2, 7, len(data)):
                side = ClientSide()
                for i in range(0, len(data), size):
                    side.receive(data[i : i + size])
                request = side.next_event()
                self.assertIsInstance(request, Request, (data, size))
                self.assertEqual(request.headers.raw_items()[0][0], b"Host")
        self.assertEqual(side.rest(), b"")
        self.assertEqual(
            OriginSide().request(request, "example.com", 8080, "/p", close=False),
            b"GET /p HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\n\r\n",
        )
        side = ClientSide()
        side.receive(connect)
        self.assertEqual((side.next_event().target, side.rest()), (b"example.com:443", b"\x16\x03\x01"))

    def test_host_checks_kept(self):
        """h11 still judges the rest: two Hosts, a bad request line, or an origin-form request without Host are 400."""
        for data in (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", b"GET /x HTTP/1.1\r\n\r\n",
                     b"GET http://a/\x7f HTTP/1.1\r\n\r\n", b"GET http://a/ HTTP/1.1\r\nHost : a\r\n\r\n"):
            self.assertEqual(refused(client_events, data), 400, data)


def _keep_alive_exchange(request: bytes, response: Response, body: bytes = b"") -> tuple[ClientSide, bytes, bool]:
    """Read `request`, answer `response` and `body`: the side, what the application got, and whether a next request may come."""
    side = ClientSide()
    side.receive(request)
    while side.next_event() is not None:
        pass
    out = side.respond(response) + (side.respond_data(body) if body else b"") + side.respond_end([])
    return side, out, side.next_request()


class Http10KeepAliveTests(unittest.SynchronousTestCase):
    """An HTTP/1.0 client that asks for keep-alive keeps its connection when a response's length is known."""

    def test_keep_alive_with_length(self):
        """Connection or Proxy-Connection: keep-alive and a Content-Length: the head says keep-alive and the next request is read."""
        for token in (b"Connection: keep-alive", b"Proxy-Connection: Keep-Alive", b"Connection: Keep-Alive, X-A\r\nX-A: 1"):
            side, out, more = _keep_alive_exchange(
                b"GET http://a/1 HTTP/1.0\r\n" + token + b"\r\n\r\nGET http://a/2 HTTP/1.0\r\n\r\n",
                Response(status_code=200, reason=b"OK", headers=[("Content-Length", "3"), ("Connection", "close")]),
                b"abc",
            )
            self.assertEqual(out, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc", token)
            self.assertTrue(more, token)
            self.assertEqual(side.next_event().target, b"http://a/2")

    def test_keep_alive_without_body(self):
        """HEAD, 204 and 304 responses end with their head: the connection stays."""
        for method, status in ((b"HEAD", 200), (b"GET", 204), (b"GET", 304)):
            _, out, more = _keep_alive_exchange(
                method + b" http://a/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", Response(status_code=status, headers=[])
            )
            self.assertTrue(more, (method, status))
            self.assertTrue(out.endswith(b"\r\nConnection: keep-alive\r\n\r\n"), out)

    def test_no_keep_alive(self):
        """No keep-alive asked, close too, a body of unknown length, or a response before the request's end: it closes."""
        length = Response(status_code=200, headers=[("Content-Length", "3")])
        unknown = Response(status_code=200, headers=[("Transfer-Encoding", "chunked")])
        for request, response in (
            (b"GET http://a/ HTTP/1.0\r\n\r\n", length),
            (b"GET http://a/ HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", length),
            (b"GET http://a/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", unknown),
        ):
            _, out, more = _keep_alive_exchange(request, response, b"abc")
            self.assertFalse(more, request)
            self.assertIn(b"\r\nConnection: close\r\n", out, request)
            self.assertTrue(out.endswith(b"\r\n\r\nabc"), out)
        side = ClientSide()
        side.receive(b"POST http://a/ HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nab")
        side.next_event()
        side.next_event()
        out = side.respond(length, close=True) + side.respond_data(b"abc") + side.respond_end([])
        self.assertIn(b"\r\nConnection: close\r\n", out)
        self.assertFalse(side.next_request())

    def test_response_head(self):
        """A head written without h11 reads back through h11 as it was given."""
        head = response_head(404, b"Not Found", [(b"Content-Length", b"2"), (b"X-A", b"b c")])
        self.assertEqual(head, b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nX-A: b c\r\n\r\n")
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]))
        client.receive_data(head + b"ok")
        event = client.next_event()
        self.assertEqual((event.status_code, event.reason, event.headers.raw_items()),
                         (404, b"Not Found", [(b"Content-Length", b"2"), (b"X-A", b"b c")]))


def _response(events_data: bytes, method: bytes = b"GET", eof: bool = True, version: bytes = b"1.1") -> bytes:
    """What the application gets of `events_data` from the origin, through both codecs."""
    client = ClientSide()
    client.receive(method + b" http://h/ HTTP/" + version + b"\r\n" + (b"Host: h\r\n" if version == b"1.1" else b"") + b"\r\n")
    request = client.next_event()
    client.next_event()
    origin = OriginSide()
    origin.request(request, "h", 80, "/", close=False)
    origin.send_end([])
    origin.receive(events_data)
    if eof:
        origin.receive(b"")
    out = b""
    while (event := origin.next_event()) is not None:
        if type(event) is Data:
            out += client.respond_data(event.data)
        elif type(event) is EndOfMessage:
            out += client.respond_end(event.headers.raw_items())
        else:
            out += client.respond(event)
    return out


class OriginSideTests(unittest.SynchronousTestCase):
    """Responses as the origin sends them, and as the application then gets them."""

    def test_framing_rules(self):
        """HEAD, 1xx, 204 and 304 have no body; chunked; a length; otherwise until close, chunked to HTTP/1.1."""
        self.assertEqual(_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD", eof=False),
                         b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", eof=False),
                         b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(_response(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", eof=False),
                         b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nab\r\n0\r\nX-T: 1\r\n\r\n",
                                   eof=False),
                         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-T: 1\r\n\r\n")
        self.assertEqual(_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab", eof=False),
                         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab")
        self.assertEqual(_response(b"HTTP/1.0 200 OK\r\n\r\nabc"),
                         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(_response(b"HTTP/1.0 200 OK\r\n\r\nabc", version=b"1.0"),
                         b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc")
        self.assertEqual(_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-T: 1\r\n\r\n",
                                   version=b"1.0", eof=False),
                         b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\na")

    def test_bad_responses(self):
        """Malformed or unframeable responses, and ones cut short, are 502."""
        for data, eof in (
            (b"ICY 200 OK\r\n\r\n", False),
            (b"HTTP/2.0 200 OK\r\n\r\n", False),
            (b"HTTP/1.1 2000 OK\r\n\r\n", False),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", False),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", False),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n", False),
            (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", False),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", False),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", True),
            (b"", True),
            (b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD, False),
        ):
            self.assertEqual(refused(lambda d: origin_events(d, eof=eof), data), 502, data[:50])

    def test_content_length_ascii_digits(self):
        """An origin's Content-Length must be at most 20 ASCII digits, or it is 502."""
        for value in ("\u00b2", "9" * 5000, "9" * 21, "-1"):
            data = f"HTTP/1.1 200 OK\r\nContent-Length: {value}\r\n\r\n".encode()
            self.assertEqual(refused(origin_events, data), 502, value[:10])

    def test_reuse(self):
        """The connection carries another request after a framed response, not after close or extra bytes."""
        origin = origin_after()
        origin.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual([type(origin.next_event()), type(origin.next_event())], [Response, EndOfMessage])
        self.assertTrue(origin.next_request())
        for data in (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                     b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nextra",
                     b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"):
            origin = origin_after()
            origin.receive(data)
            origin.next_event()
            self.assertIsInstance(origin.next_event(), EndOfMessage)
            self.assertFalse(origin.next_request(), data)


def _chunked(pieces: list[bytes], trailers: list[bytes]) -> bytes:
    out = b"".join(b"%x;ext=1\r\n" % len(p) + p + b"\r\n" for p in pieces if p)
    return out + b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"


_header_names = st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True)
_header_values = st.from_regex(r"[!-~]([ !-~]{0,20}[!-~])?", fullmatch=True)
_headers = st.lists(st.tuples(_header_names, _header_values), max_size=5)
_trailers = st.lists(st.from_regex(rb"X-[a-z]{1,8}: [a-z0-9]{1,10}", fullmatch=True), max_size=3)


@st.composite
def _message(draw, kind: str) -> tuple[bytes, bytes, str]:
    """A request or response head with a fixed, chunked or (responses) close-delimited body: (bytes, body, framing)."""
    body = draw(st.binary(max_size=600))
    framing = draw(st.sampled_from(["fixed", "chunked", "close"] if kind == "response" else ["fixed", "chunked", "none"]))
    headers = "".join(f"{k}: {v}\r\n" for k, v in draw(_headers))
    if kind == "request":
        # (Host may be left out of a proxy request: see MissingHostTests.)
        host = draw(st.sampled_from(["Host: h\r\n", ""]))
        first = f"{draw(st.sampled_from(['GET', 'POST', 'PUT', 'PATCH']))} http://h{draw(st.sampled_from(['', ':8080']))}/x HTTP/1.1\r\n{host}"
    else:
        # (204 and 304 have no body whatever the headers say: see test_framing_rules.)
        status = draw(st.integers(200, 599).filter(lambda code: code not in (204, 304)))
        first = f"HTTP/1.{draw(st.sampled_from(['0', '1']))} {status} Reason\r\n"
    if framing == "fixed":
        data = f"{first}Content-Length: {len(body)}\r\n{headers}\r\n".encode() + body
    elif framing == "chunked":
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
        data = f"{first}Transfer-Encoding: chunked\r\n{headers}\r\n".encode() + _chunked(pieces, draw(_trailers))
    elif framing == "close":
        data = f"{first}{headers}\r\n".encode() + body
    else:
        data, body = f"{first}{headers}\r\n".encode(), b""
    return data, body, framing


def _split(data: bytes, draw) -> list[bytes]:
    """`data` in pieces (none empty: b"" is an OriginSide's EOF)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=10)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)]) if b > a]


def _mutate(data: bytes, draw) -> bytes:
    """`data` with a few bytes replaced, inserted or removed."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        byte = draw(st.sampled_from([0, 9, 10, 13, 32, 44, 48, 58, 59, 0x7F, 0xB2, 0xFF, ord("a")]))
        how = draw(st.sampled_from(["replace", "insert", "delete"]))
        if how == "replace":
            data[at] = byte
        elif how == "insert":
            data.insert(at, byte)
        else:
            del data[at]
    return bytes(data)


class FuzzTests(unittest.SynchronousTestCase):
    """Whatever arrives, in whatever pieces: whole messages pass, anything else is HttpError, nothing else escapes."""

    def drive_client(self, pieces: list[bytes]) -> tuple[list[Request], bytes, bytes]:
        """Feed a ClientSide and forward what it reads through an OriginSide: the heads, the body, the origin's bytes."""
        side, origin = ClientSide(), OriginSide()
        heads: list[Request] = []
        body = sent = b""
        for piece in pieces:
            side.receive(piece)
            while (event := side.next_event()) is not None:
                if type(event) is Request:
                    heads.append(event)
                    host, port, path = absolute_target(event.target.decode("ascii"))
                    sent += origin.request(event, host, port, path, close=False)
                elif type(event) is Data:
                    body += event.data
                    sent += origin.send_data(event.data)
                else:
                    sent += origin.send_end(event.headers.raw_items())
                    # A response, and on to the next request.
                    side.respond(Response(status_code=200, headers=[("Content-Length", "0")]))
                    side.respond_end([])
                    if not side.next_request():
                        return heads, body, sent
        return heads, body, sent

    def drive_origin(self, pieces: list[bytes], method: bytes, version: bytes) -> tuple[bytes, bool, bytes]:
        """Feed an OriginSide the response in pieces (then EOF) and write it through a ClientSide: body, ended, output."""
        client = ClientSide()
        # version: b"1.1", b"1.0", or b"1.0 keep-alive" (asking for it)
        version, _, token = version.partition(b" ")
        keep_alive = b"Connection: " + token + b"\r\n" if token else b""
        client.receive(method + b" http://h/ HTTP/" + version + b"\r\nHost: h\r\n" + keep_alive + b"\r\n")
        request = client.next_event()
        client.next_event()
        origin = OriginSide()
        origin.request(request, "h", 80, "/", close=False)
        origin.send_end([])
        body = out = b""
        ended = False
        for piece in [*pieces, b""]:
            origin.receive(piece)
            while not ended and (event := origin.next_event()) is not None:
                if type(event) is Data:
                    body += event.data
                    out += client.respond_data(event.data)
                elif type(event) is EndOfMessage:
                    out += client.respond_end(event.headers.raw_items())
                    ended = True
                else:
                    out += client.respond(event)
        return body, ended, out

    @_settings
    @given(_message("request"), st.data())
    def test_request_any_split(self, message, data):
        """A well-formed request gives the same head and body however it is split, and reaches the origin whole."""
        raw, body, framing = message
        heads, got, sent = self.drive_client(_split(raw, data.draw))
        self.assertEqual((len(heads), got), (1, body))
        origin = h11.Connection(h11.SERVER)
        origin.receive_data(sent)
        events = []
        while type(event := origin.next_event()) not in (h11.EndOfMessage, type(h11.NEED_DATA)):
            events.append(event)
        self.assertIs(type(event), h11.EndOfMessage)
        self.assertEqual(b"".join(e.data for e in events[1:]), body)
        self.assertEqual(events[0].target, b"/x")

    @_settings
    @given(_message("response"), st.sampled_from([b"GET", b"HEAD"]), st.sampled_from([b"1.0", b"1.0 keep-alive", b"1.1"]), st.data())
    def test_response_any_split(self, message, method, version, data):
        """A well-formed response gives the same body however it is split (none for HEAD), and the application can read it (kept alive for HTTP/1.0 when it can)."""
        raw, body, framing = message
        got, ended, out = self.drive_origin(_split(raw, data.draw), method, version)
        self.assertTrue(ended)
        self.assertEqual(got, b"" if method == b"HEAD" else body)
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method=method, target="/", headers=[("Host", "h")]))
        client.send(h11.EndOfMessage())
        client.receive_data(out)
        client.receive_data(b"")
        events = []
        while type(event := client.next_event()) is not h11.EndOfMessage:
            events.append(event)
        self.assertEqual(b"".join(e.data for e in events[1:]), got)
        if version == b"1.0 keep-alive":
            # Kept when the application can see where the response ends.
            kept = b"\r\nconnection: keep-alive\r\n" in out.partition(b"\r\n\r\n")[0].lower() + b"\r\n"
            self.assertEqual(kept, framing == "fixed" or method == b"HEAD", out[:200])

    @_settings
    @given(_message("request"), st.data())
    def test_request_mutated(self, message, data):
        """A request with bytes changed, added or removed is read or refused with HttpError, nothing else."""
        raw = _mutate(message[0], data.draw)
        try:
            self.drive_client(_split(raw, data.draw))
        except HttpError:
            pass

    @_settings
    @given(_message("response"), st.sampled_from([b"GET", b"HEAD"]), st.sampled_from([b"1.0", b"1.0 keep-alive", b"1.1"]), st.data())
    def test_response_mutated(self, message, method, version, data):
        """A response with bytes changed, added or removed is passed on or refused with HttpError, nothing else."""
        raw = _mutate(message[0], data.draw)
        try:
            self.drive_origin(_split(raw, data.draw), method, version)
        except HttpError:
            pass

    @_settings
    @given(st.binary(max_size=600), st.data())
    def test_request_bytes(self, raw, data):
        """Arbitrary bytes from an application, after a valid start or not, are HttpError or nothing."""
        prefix = data.draw(st.sampled_from([b"", b"GET http://h/ HTTP/1.1\r\nHost: h\r\n", b"POST http://h/ HTTP/1.1\r\n"
                                            b"Host: h\r\nTransfer-Encoding: chunked\r\n\r\n"]))
        try:
            self.drive_client(_split(prefix + raw, data.draw))
        except HttpError:
            pass

    @_settings
    @given(st.binary(max_size=600), st.sampled_from([b"GET", b"HEAD"]), st.data())
    def test_response_bytes(self, raw, method, data):
        """Arbitrary bytes from an origin, after a valid start or not, are HttpError or a response."""
        prefix = data.draw(st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                            b"HTTP/1.1 100 Continue\r\n\r\n"]))
        try:
            self.drive_origin(_split(prefix + raw, data.draw), method, b"1.1")
        except HttpError:
            pass
