#!/usr/bin/env python3
"""Writes the seed corpus of ws_client_fuzz (corpus/ws_client_fuzz/): one file per case,
flags byte first (see ws_client_fuzz.cc), then what the server sends. "@A@" stands for
the correct Sec-WebSocket-Accept. Rerun after changing a case; the files are committed."""
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "ws_client_fuzz")

# flags: bits 0-1 subprotocols (0 none, 1 [json], 2 [json, v2], 3 [v2]);
# bits 2-3 max_message_bytes (0: 64, 1: 200, 2: 4096, 3: 1 MiB); bits 4-6 read size.
def flags(protos=0, limit=3, read=0):
    return bytes([protos | (limit << 2) | (read << 4)])

def answer(*extra, status=b"HTTP/1.1 101 Switching Protocols", accept=b"@A@"):
    h = [status, b"Upgrade: websocket", b"Connection: Upgrade"]
    if accept is not None:
        h.append(b"Sec-WebSocket-Accept: " + accept)
    h.extend(extra)
    return b"\r\n".join(h) + b"\r\n\r\n"

def frame(op, payload=b"", fin=True, rsv=0, mask=None, length=None, ext=None):
    b0 = (0x80 if fin else 0) | (rsv << 4) | op
    n = len(payload) if length is None else length
    if ext == 16 or (ext is None and 126 <= n < 65536):
        hdr = bytes([b0, 126 | (0x80 if mask else 0)]) + struct.pack(">H", n)
    elif ext == 64 or (ext is None and n >= 65536):
        hdr = bytes([b0, 127 | (0x80 if mask else 0)]) + struct.pack(">Q", n)
    else:
        hdr = bytes([b0, n | (0x80 if mask else 0)])
    if mask:
        hdr += mask
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    return hdr + payload

def close(code=None, reason=b""):
    return frame(8, b"" if code is None else struct.pack(">H", code) + reason)

OK = answer()
CASES = {
    # Handshake answers.
    "ok_text_then_close": flags() + OK + frame(1, b"hello") + close(1000, b"bye"),
    "ok_json_subprotocol": flags(protos=1) + answer(b"Sec-WebSocket-Protocol: json")
        + frame(2, b"\x00\x01\x02") + frame(9, b"p") + frame(10) + close(1001),
    "subprotocol_not_requested": flags() + answer(b"Sec-WebSocket-Protocol: json") + frame(1, b"x"),
    "subprotocol_other_than_requested": flags(protos=3) + answer(b"Sec-WebSocket-Protocol: json"),
    "subprotocol_missing": flags(protos=2) + OK + frame(1, b"x"),
    "subprotocol_two_chosen": flags(protos=2) + answer(b"Sec-WebSocket-Protocol: json, v2"),
    "accept_wrong": flags() + answer(accept=b"dGhlIHNhbXBsZSBub25jZQ==") + frame(1, b"x"),
    "accept_missing": flags() + answer(accept=None) + frame(1, b"x"),
    "status_200": flags() + answer(status=b"HTTP/1.1 200 OK") + frame(1, b"x"),
    "status_line_garbage": flags() + answer(status=b"HTTX/1.1 101 Switching Protocols"),
    "status_401_with_body": flags() + b"HTTP/1.1 401 Unauthorized\r\nRetry-After: 30\r\n"
        b"Content-Length: 27\r\n\r\n{\"error\":\"bad tok-s3cr3t\"}\n",
    "status_101_http10": flags() + answer(status=b"HTTP/1.0 101 Switching Protocols"),
    # Frames.
    "masked_frame": flags() + OK + frame(1, b"hello", mask=b"\x01\x02\x03\x04"),
    "len16_not_shortest": flags() + OK + frame(2, b"abcde", ext=16),
    "len64_not_shortest": flags() + OK + frame(2, b"abcde", ext=64),
    "len64_top_bit": flags() + OK + frame(2, b"", length=1 << 63, ext=64),
    "text_bad_utf8": flags() + OK + frame(1, b"ok") + frame(1, b"\xc0\xaf"),
    "text_surrogate": flags() + OK + frame(1, b"\xed\xa0\x80"),
    "text_truncated_utf8": flags() + OK + frame(1, b"\xe2\x82"),
    "text_utf8_split_across_frames": flags() + OK + frame(1, b"\xe2", fin=False)
        + frame(0, b"\x82\xac") + close(1000),
    "ping_126_bytes": flags() + OK + frame(9, b"p" * 126),
    "close_126_bytes": flags() + OK + frame(8, b"\x03\xe8" + b"r" * 124),
    "ping_fragmented": flags() + OK + frame(9, b"p", fin=False),
    "continuation_without_start": flags() + OK + frame(0, b"a"),
    "data_frame_inside_fragmented": flags() + OK + frame(1, b"a", fin=False) + frame(1, b"b"),
    "fragmented_with_control_between": flags() + OK + frame(1, b"he", fin=False) + frame(9)
        + frame(0, b"l", fin=False) + frame(10, b"x") + frame(0, b"lo") + close(1000),
    "fragmented_past_limit": flags(limit=0) + OK + frame(2, b"a" * 40, fin=False)
        + frame(0, b"b" * 40) + frame(2, b"never"),
    "single_frame_past_limit": flags(limit=1) + OK + frame(2, b"z" * 201),
    "at_limit": flags(limit=0) + OK + frame(2, b"y" * 64) + close(1000),
    "long_message_two_parts": flags(limit=2) + OK + frame(1, b"m" * 1500) + close(4000, b"done"),
    "reserved_opcode": flags() + OK + frame(3, b"x"),
    "reserved_control_opcode": flags() + OK + frame(11),
    "rsv_bits": flags() + OK + frame(1, b"x", rsv=4),
    "close_no_code": flags() + OK + close(),
    "close_one_byte": flags() + OK + frame(8, b"\x03"),
    "close_1005": flags() + OK + close(1005),
    "close_1015": flags() + OK + close(1015),
    "close_999": flags() + OK + close(999),
    "close_2999": flags() + OK + close(2999),
    "close_5000": flags() + OK + close(5000),
    "close_1008_policy": flags() + OK + close(1008, b"token expired"),
    "close_1013_try_later": flags() + OK + close(1013),
    "close_reason_bad_utf8": flags() + OK + close(1000, b"\xff"),
    "eof_mid_header": flags() + OK + frame(1, b"x") + b"\x82",
    "eof_mid_payload": flags() + OK + frame(2, b"", length=10) + b"abc",
    "sliced_one_byte_reads": flags(protos=1, read=1) + answer(b"Sec-WebSocket-Protocol: json")
        + frame(1, b"sliced") + frame(9) + close(1000),
    "sliced_seven_byte_reads": flags(limit=2, read=4) + OK + frame(2, bytes(range(256)) * 3)
        + close(1001, b"going"),
    # A second header instance must count: an extension after an empty first one, a
    # second accept or Upgrade value, two subprotocols.
    "answer_extension_in_second_header": flags() + answer(b"Sec-WebSocket-Extensions: ",
        b"Sec-WebSocket-Extensions: permessage-deflate") + frame(2, b"\xf2\x00", rsv=4),
    "answer_two_accept_headers": flags() + answer(b"Sec-WebSocket-Accept: x") + frame(1, b"hi"),
    "answer_second_upgrade_header": flags() + answer(b"Upgrade: h2c") + frame(1, b"hi"),
    "answer_two_subprotocol_headers": flags(protos=2) + answer(b"Sec-WebSocket-Protocol: json",
        b"Sec-WebSocket-Protocol: v2") + frame(1, b"hi"),
    "answer_connection_upgrade_in_second_header": flags() + answer(status=b"HTTP/1.1 101 Switching Protocols")
        .replace(b"Connection: Upgrade", b"Connection: keep-alive\r\nConnection: Upgrade") + frame(1, b"ok"),
}

def main():
    os.makedirs(HERE, exist_ok=True)
    for name, data in CASES.items():
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)

if __name__ == "__main__":
    main()
