"""HTTP/1.x heads and body framing for the HTTP proxy (sans-IO): parsing, rewriting, limits, fuzzing."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from ssx.errors import ProtocolError
from ssx.wire.http_framing import ChunkedBody, LengthBody, NoBody, UntilClose, request_body, response_body
from ssx.wire.http_message import (
    MAX_HEAD,
    HttpError,
    absolute_target,
    basic_credentials_ok,
    connect_target,
    error_response,
    find_head_end,
    forward_request,
    forward_response,
    parse_request_head,
    parse_response_head,
)

_settings = settings(max_examples=200, deadline=None, database=None)


def head_of(text: str):
    return parse_request_head(text.replace("\n", "\r\n").encode())


class HeadTests(unittest.SynchronousTestCase):
    """Finding and parsing request and response heads."""

    def test_find_end(self):
        """The head ends after the blank line (CRLF or bare LF); the body is not part of it."""
        self.assertEqual(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"), 27)
        self.assertEqual(find_head_end(b"GET / HTTP/1.1\nHost: a\n\nbody"), 24)
        self.assertIsNone(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"))

    def test_head_limit(self):
        """A head over 64 KiB is refused with 431, whether or not its end has arrived."""
        big = b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD
        for data in (big, big + b"\r\n\r\n"):
            with self.assertRaises(HttpError) as caught:
                find_head_end(data)
            self.assertEqual(caught.exception.status, 431)

    def test_request(self):
        """Method, target, version and headers (order and case kept) are read."""
        request = head_of("POST http://example.org/x?y=1 HTTP/1.1\nHost: example.org\nContent-Length: 3\nX-A:  b \n\n")
        self.assertEqual((request.method, request.target, request.version), ("POST", "http://example.org/x?y=1", "HTTP/1.1"))
        self.assertEqual(request.get("x-a"), "b")
        self.assertIsInstance(request_body(request), LengthBody)

    def test_malformed_requests(self):
        """Malformed request lines and headers are 400; smuggling-prone framing is 400 or 501."""
        cases = [
            ("GET http://a/ HTTP/2.0\n\n", 400),
            ("GET  http://a/ HTTP/1.1\n\n", 400),
            ("GET http://a/\n\n", 400),
            ("G(T http://a/ HTTP/1.1\n\n", 400),
            ("GET http://a/ HTTP/1.1\nBad Header: x\n\n", 400),
            ("GET http://a/ HTTP/1.1\nX: a\n folded\n\n", 400),
            ("GET http://a/ HTTP/1.1\nNoColon\n\n", 400),
            ("POST http://a/ HTTP/1.1\nContent-Length: 1\nContent-Length: 2\n\n", 400),
            ("POST http://a/ HTTP/1.1\nContent-Length: -1\n\n", 400),
            ("POST http://a/ HTTP/1.1\nTransfer-Encoding: chunked\nContent-Length: 2\n\n", 400),
            ("POST http://a/ HTTP/1.1\nTransfer-Encoding: gzip\n\n", 501),
        ]
        for text, status in cases:
            with self.assertRaises(HttpError, msg=text) as caught:
                head_of(text)
            self.assertEqual(caught.exception.status, status, text)

    def test_response(self):
        """Status line and headers of a response; a bad status line is 502."""
        response = parse_response_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual((response.status, response.reason), (404, "Not Found"))
        self.assertEqual(parse_response_head(b"HTTP/1.1 204\r\n\r\n").reason, "")
        with self.assertRaises(HttpError) as caught:
            parse_response_head(b"ICY 200 OK\r\n\r\n")
        self.assertEqual(caught.exception.status, 502)

    def test_targets(self):
        """Absolute-form targets give host, port (80 by default) and origin-form path; CONNECT gives host and port."""
        self.assertEqual(absolute_target("http://example.org/a/b?c=d#frag"), ("example.org", 80, "/a/b?c=d"))
        self.assertEqual(absolute_target("http://[2001:db8::1]:8080"), ("2001:db8::1", 8080, "/"))
        self.assertEqual(absolute_target("HTTP://h:81?q"), ("h", 81, "/?q"))
        self.assertEqual(connect_target(head_of("CONNECT example.org:443 HTTP/1.1\n\n")), ("example.org", 443))
        self.assertEqual(connect_target(head_of("CONNECT [::1]:22 HTTP/1.1\n\n")), ("::1", 22))
        for bad in ("/just/a/path", "https://example.org/", "http://u:p@h/", "http://h:0/", "http://h:99999/", "http:///x"):
            with self.assertRaises(HttpError, msg=bad):
                absolute_target(bad)
        for bad in ("CONNECT example.org HTTP/1.1\n\n", "CONNECT [::1 HTTP/1.1\n\n"):
            with self.assertRaises(HttpError, msg=bad):
                connect_target(head_of(bad))


class RewriteTests(unittest.SynchronousTestCase):
    """What the origin and the client get."""

    def test_forward_request(self):
        """Origin-form target, Host from the URL, hop-by-hop headers (and those Connection names) removed, others kept in order."""
        request = head_of(
            "GET http://example.org:8080/p?q HTTP/1.1\nHost: wrong.example\nProxy-Authorization: Basic eDp5\n"
            "Proxy-Connection: keep-alive\nConnection: X-Private, keep-alive\nKeep-Alive: 300\nX-Private: 1\n"
            "TE: trailers\nUpgrade: h2c\nAccept: */*\nTransfer-Encoding: chunked\nCookie: a=b\n\n"
        )
        self.assertEqual(
            forward_request(request, "example.org", 8080, "/p?q"),
            b"GET /p?q HTTP/1.1\r\nHost: example.org:8080\r\nAccept: */*\r\nTransfer-Encoding: chunked\r\n"
            b"Cookie: a=b\r\n\r\n",
        )

    def test_forward_request_close(self):
        """A client that says Connection: close has it passed on (its intent, not its header)."""
        request = head_of("GET http://h/ HTTP/1.1\nConnection: close\n\n")
        self.assertEqual(forward_request(request, "h", 80, "/"), b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertTrue(request.wants_close())
        self.assertTrue(head_of("GET http://h/ HTTP/1.0\n\n").wants_close())
        self.assertFalse(head_of("GET http://h/ HTTP/1.0\nProxy-Connection: Keep-Alive\n\n").wants_close())

    def test_forward_response(self):
        """Hop-by-hop headers go; Connection says whether the client connection stays."""
        response = parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: 5\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(forward_response(response, close=False), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(
            forward_response(response, close=True), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
        )
        old = parse_response_head(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n")
        self.assertIn(b"Connection: keep-alive", forward_response(old, close=False))

    def test_basic_credentials(self):
        """Basic credentials match only when both halves do; other schemes and bad base64 do not."""
        token = base64.b64encode(b"alice:s3:cret").decode()
        good = head_of(f"GET http://h/ HTTP/1.1\nProxy-Authorization: Basic {token}\n\n")
        self.assertTrue(basic_credentials_ok(good, (b"alice", b"s3:cret")))
        self.assertFalse(basic_credentials_ok(good, (b"alice", b"s3")))
        for value in ("Bearer x", "Basic !!!", "Basic " + base64.b64encode(b"alice").decode(), ""):
            request = head_of(f"GET http://h/ HTTP/1.1\nProxy-Authorization: {value}\n\n")
            self.assertFalse(basic_credentials_ok(request, (b"alice", b"s3:cret")), value)

    def test_error_response(self):
        """The proxy's own answers are complete responses that close."""
        response = error_response(407, "credentials", (("Proxy-Authenticate", 'Basic realm="ssx"'),))
        head, _, body = response.partition(b"\r\n\r\n")
        parsed = parse_response_head(head + b"\r\n\r\n")
        self.assertEqual(parsed.status, 407)
        self.assertEqual(int(parsed.get("content-length")), len(body))
        self.assertEqual(parsed.get("connection"), "close")


def _chunked(pieces: list[bytes], trailers: list[str]) -> bytes:
    out = b"".join(b"%x;ext=1\r\n" % len(p) + p + b"\r\n" for p in pieces if p)
    return out + b"0\r\n" + "".join(f"{t}\r\n" for t in trailers).encode() + b"\r\n"


class FramingTests(unittest.SynchronousTestCase):
    """Where bodies end."""

    def test_response_framing_rules(self):
        """HEAD, 1xx, 204 and 304 have no body; chunked last wins; a length; otherwise until close."""
        def framer(method, head):
            return type(response_body(method, parse_response_head(head)))

        self.assertIs(framer("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"), NoBody)
        self.assertIs(framer("GET", b"HTTP/1.1 100 Continue\r\n\r\n"), NoBody)
        self.assertIs(framer("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"), NoBody)
        self.assertIs(framer("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"), ChunkedBody)
        self.assertIs(framer("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"), UntilClose)
        self.assertIs(framer("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"), LengthBody)
        self.assertIs(framer("GET", b"HTTP/1.0 200 OK\r\n\r\n"), UntilClose)
        self.assertIs(type(request_body(head_of("GET http://h/ HTTP/1.1\n\n"))), NoBody)
        self.assertIs(type(request_body(head_of("POST http://h/ HTTP/1.1\nTransfer-Encoding: chunked\n\n"))), ChunkedBody)

    def test_chunked_bad(self):
        """Bad chunk sizes, missing CRLF after data and overlong lines are ProtocolErrors."""
        for data in (b"zz\r\n", b"3\r\nabcX\r\n", b"1" * 5000, b"-1\r\n", b"11111111111111111\r\n"):
            with self.assertRaises(ProtocolError, msg=data):
                ChunkedBody().feed(data)

    @_settings
    @given(
        st.lists(st.binary(max_size=300), max_size=6),
        st.lists(st.from_regex(r"X-[a-z]{1,8}: [a-z0-9]{0,10}", fullmatch=True), max_size=3),
        st.binary(max_size=50),
        st.data(),
    )
    def test_chunked_any_split(self, pieces, trailers, after, data):
        """A chunked body ends exactly at its last byte however it is split, leaving what follows untouched."""
        body = _chunked(pieces, trailers)
        stream = body + after
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        framer = ChunkedBody()
        taken = 0
        for a, b in zip([0, *cuts], [*cuts, len(stream)]):
            if framer.done:
                break
            n = framer.feed(stream[a:b])
            self.assertLessEqual(n, b - a)
            taken += n
            if not framer.done:
                self.assertEqual(n, b - a)
        self.assertTrue(framer.done)
        self.assertEqual(taken, len(body))

    @_settings
    @given(st.integers(0, 10_000), st.lists(st.integers(1, 4000), max_size=6))
    def test_length_any_split(self, length, sizes):
        """A Content-Length body takes exactly its length from whatever arrives."""
        framer = LengthBody(length)
        taken = 0
        for size in sizes + [length + 1]:
            taken += framer.feed(b"x" * size)
        self.assertEqual((taken, framer.done), (length, True))

    @_settings
    @given(st.binary(max_size=400))
    def test_chunked_fuzz(self, data):
        """Arbitrary bytes fed to the chunked framer are consumed, end it, or raise ProtocolError only."""
        framer = ChunkedBody()
        try:
            n = framer.feed(data)
        except ProtocolError:
            return
        self.assertTrue(n == len(data) or framer.done)

    @_settings
    @given(st.binary(max_size=600))
    def test_head_fuzz(self, data):
        """Arbitrary bytes as a request or response head parse or raise HttpError, nothing else."""
        for parse in (parse_request_head, parse_response_head):
            try:
                end = find_head_end(data)
                parse(data[:end] if end else data)
            except HttpError:
                pass

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
