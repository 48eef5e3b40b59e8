"""
Shadowsocks 2022 (SIP022, with SIP023 identity headers): the edition's
suite and sans-IO codecs, the face of this package.

The work is split by job: `suite` (`Suite2022` and the codecs it hands the
relays), `keys` (methods, PSKs, BLAKE3 subkeys, AES blocks), `replay`
(timestamp window, salt pool, sliding window), `chunks` (the TCP chunk
stream after the headers), `tcp` (request/response header codecs), `udp`
(packet codecs; the ChaCha method's packets use `ssx.crypto._xchacha`,
which AEAD-2017's xchacha20-ietf-poly1305 shares).
Nothing here imports Twisted or reads the clock: the protocol layer passes
``now`` (e.g. ``reactor.seconds``) and, in tests, fixed randomness.
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
