#!/usr/bin/env python3
"""Hand-made ClientHello fixtures, derived from the captured ones.

Captured (real clients against a listener that saved the first bytes):
  openssl-sni-alpn.bin   openssl s_client -servername gateway.example.test -alpn h2,http/1.1
  openssl-tls12-sni.bin  openssl s_client -servername api.example.test -tls1_2
  openssl-no-sni.bin     openssl s_client -noservername
  curl-sni-alpn.bin      curl -k https://a.example.test/ (connect-to the listener)
Run this script from its directory to regenerate the hand-made ones below.
"""
import struct

def records(handshake, size, version=b"\x03\x01"):
    out = b""
    for i in range(0, len(handshake), size):
        chunk = handshake[i:i + size]
        out += b"\x16" + version + struct.pack(">H", len(chunk)) + chunk
    return out

def handshake_of(buf):
    out, pos = b"", 0
    while pos < len(buf):
        n = struct.unpack(">H", buf[pos + 3:pos + 5])[0]
        out += buf[pos + 5:pos + 5 + n]
        pos += 5 + n
    return out

def hello(extensions):
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    ext = b"".join(struct.pack(">HH", t, len(d)) + d for t, d in extensions)
    body += struct.pack(">H", len(ext)) + ext
    return b"\x01" + struct.pack(">I", len(body))[1:] + body

def sni(name):
    entry = b"\x00" + struct.pack(">H", len(name)) + name
    return (0, struct.pack(">H", len(entry)) + entry)

base = open("openssl-sni-alpn.bin", "rb").read()
hs = handshake_of(base)
open("fragmented-7.bin", "wb").write(records(hs, 7))
open("truncated.bin", "wb").write(base[:-40])
open("http-request.bin", "wb").write(b"GET / HTTP/1.1\r\nHost: a.example.test\r\n\r\n")
open("sslv2.bin", "wb").write(bytes.fromhex("802e0103010015000000100100800300800700c006004000400200800000049d3a6f0a8e2b3c1d5e6f708192a3b4c5"))
open("duplicate-sni.bin", "wb").write(records(hello([sni(b"a.example.test"), sni(b"b.example.test")]), 16384))
open("ip-sni.bin", "wb").write(records(hello([sni(b"10.0.0.1")]), 16384))
# Declares a 64 KiB handshake message: refused from its header, before it is buffered.
open("oversized.bin", "wb").write(b"\x16\x03\x01\x40\x00\x01\x01\x00\x00" + bytes(100))
open("server-hello.bin", "wb").write(b"\x16\x03\x03\x00\x30\x02\x00\x00\x2c" + bytes(44))
