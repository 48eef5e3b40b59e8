"""
Shadowsocks 2022 (SIP022, with SIP023 identity headers): the public face of
the sans-IO codecs.

The work is split by job: `_2022_keys` (methods, PSKs, BLAKE3 subkeys, AES
blocks), `_2022_replay` (timestamp window, salt pool, sliding window),
`_2022_chunks` (the TCP chunk stream after the headers), `_2022_tcp`
(request/response header codecs) and `_2022_udp` (packet codecs).  Nothing here imports Twisted or reads the clock: the protocol
layer passes ``now`` (e.g. ``reactor.seconds``) and, in tests, fixed
randomness.
"""

from ssx.crypto.edition2022.keys import (
    METHODS_2022,
    Method2022,
    PskChain,
    UserKey,
    decode_psk,
    generate_psk,
    hash16,
    identity_subkey,
    lookup_method_2022,
    parse_password,
    session_subkey,
    user_table,
)
from ssx.crypto.edition2022.replay import (
    MAX_TIME_DIFF,
    SALT_RETENTION,
    WINDOW_SIZE,
    ReplayError,
    SaltChecker,
    SaltPool,
    SlidingWindow,
    StaleTimestampError,
    check_timestamp,
)
from ssx.crypto.edition2022.tcp import (
    MAX_CHUNK,
    MAX_PADDING,
    RequestDecoder,
    RequestEncoder,
    RequestHeader,
    ResponseDecoder,
    ResponseEncoder,
)
from ssx.crypto.edition2022.suite import Suite2022
from ssx.crypto.edition2022.udp import (
    UdpClientPacket,
    UdpClientSession,
    UdpServerDecoder,
    UdpServerPacket,
    UdpServerSession,
)

__all__ = [
    "METHODS_2022",
    "Method2022",
    "PskChain",
    "UserKey",
    "decode_psk",
    "generate_psk",
    "hash16",
    "identity_subkey",
    "lookup_method_2022",
    "parse_password",
    "session_subkey",
    "user_table",
    "MAX_TIME_DIFF",
    "SALT_RETENTION",
    "WINDOW_SIZE",
    "ReplayError",
    "SaltChecker",
    "SaltPool",
    "SlidingWindow",
    "StaleTimestampError",
    "check_timestamp",
    "MAX_CHUNK",
    "MAX_PADDING",
    "RequestDecoder",
    "RequestEncoder",
    "RequestHeader",
    "ResponseDecoder",
    "ResponseEncoder",
    "Suite2022",
    "UdpClientPacket",
    "UdpClientSession",
    "UdpServerDecoder",
    "UdpServerPacket",
    "UdpServerSession",
]
