"""WebSocket peers for tests/http_edge.rs (python `websockets`, sync API).

    ws.py server PORT [CERT KEY]
                               echo server (TLS with CERT KEY): greets each connection with
                               "welcome", then echoes every message (text or binary) back;
                               prints "ready" when listening
    ws.py client URL [CA SNI [CERT KEY]]
                               connects through the gateway, checks the greeting and 200 echoes
                               (text and binary, up to 256 KiB), prints "echoed N"
    ws.py idle URL SECONDS     connects, one echo, then waits up to SECONDS for the connection to
                               close; prints "closed after S" or "still open"
"""

import os
import ssl
import sys
import time

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import serve


def server(port, cert=None, key=None):
    def echo(ws):
        ws.send("welcome")
        try:
            for message in ws:
                ws.send(message)
        except ConnectionClosed:
            pass

    ctx = None
    if cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
    with serve(echo, "127.0.0.1", port, max_size=1 << 20, ssl=ctx) as srv:
        print("ready", flush=True)
        srv.serve_forever()


def open_ws(url, ca=None, sni=None, cert=None, key=None):
    kwargs = {"max_size": 1 << 20, "open_timeout": 10}
    if url.startswith("wss://"):
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
        kwargs["ssl"] = ctx
        kwargs["server_hostname"] = sni
    return connect(url, **kwargs)


def client(url, ca=None, sni=None, cert=None, key=None):
    with open_ws(url, ca, sni, cert, key) as ws:
        assert ws.recv(timeout=10) == "welcome"
        n = 0
        for i in range(200):
            if i % 2:
                msg = os.urandom(1 + (i * 1297) % (256 * 1024))
            else:
                msg = "text %d " % i + "x" * (i * 31)
            ws.send(msg)
            got = ws.recv(timeout=10)
            assert got == msg, "echo %d differs" % i
            n += 1
        print("echoed %d" % n, flush=True)


def idle(url, seconds):
    with open_ws(url) as ws:
        assert ws.recv(timeout=10) == "welcome"
        ws.send("ping")
        assert ws.recv(timeout=10) == "ping"
        start = time.monotonic()
        try:
            ws.recv(timeout=seconds)
            print("unexpected message", flush=True)
        except ConnectionClosed:
            print("closed after %.2f" % (time.monotonic() - start), flush=True)
        except TimeoutError:
            print("still open", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "server":
        server(int(sys.argv[2]), *sys.argv[3:])
    elif mode == "client":
        client(*sys.argv[2:])
    elif mode == "idle":
        idle(sys.argv[2], float(sys.argv[3]))
    else:
        sys.exit("unknown mode " + mode)
