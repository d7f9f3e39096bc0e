"""HTTP/2 clients for tests/http_edge.rs: the python `h2` state machine over a plain socket
(h2c prior knowledge) and `httpx` with http2=True (ALPN h2 over TLS, and prior knowledge).

    h2clients.py h2 HOST PORT PATH N       N requests on one connection (streams 1, 3, ...),
                                           a POST with a body among them; prints one line per
                                           response: "STATUS BODY"
    h2clients.py big HOST PORT KIB         one GET with a KIB KiB header field, sent whatever
                                           the server's SETTINGS say; prints the status, or
                                           "reset CODE" / "goaway CODE"
    h2clients.py httpx URL N [CA SNI]      N requests over one client; checks every response
                                           was HTTP/2; prints "STATUS BODY" per response
"""

import socket
import sys

import h2.config
import h2.connection
import h2.events


def h2_requests(host, port, path, n):
    sock = socket.create_connection((host, int(port)), timeout=10)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    bodies, statuses, ended = {}, {}, set()
    streams = []
    for i in range(int(n)):
        sid = conn.get_next_available_stream_id()
        streams.append(sid)
        method = "POST" if i == 1 else "GET"
        headers = [(":method", method), (":path", path), (":scheme", "http"),
                   (":authority", "%s:%s" % (host, port))]
        if method == "POST":
            conn.send_headers(sid, headers + [("content-length", "1000")])
            conn.send_data(sid, b"x" * 1000, end_stream=True)
        else:
            conn.send_headers(sid, headers, end_stream=True)
    sock.sendall(conn.data_to_send())
    while len(ended) < len(streams):
        data = sock.recv(65536)
        if not data:
            raise SystemExit("connection closed early")
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                statuses[ev.stream_id] = dict(ev.headers)[b":status"].decode()
            elif isinstance(ev, h2.events.DataReceived):
                bodies[ev.stream_id] = bodies.get(ev.stream_id, b"") + ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ended.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                raise SystemExit("stream %d reset" % ev.stream_id)
        sock.sendall(conn.data_to_send())
    conn.close_connection()
    sock.sendall(conn.data_to_send())
    for sid in streams:
        print(statuses.get(sid), bodies.get(sid, b"").decode())


def big_header(host, port, kib):
    sock = socket.create_connection((host, int(port)), timeout=10)
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    headers = [(":method", "GET"), (":path", "/big"), (":scheme", "http"),
               (":authority", "%s:%s" % (host, port)), ("x-big", "a" * (int(kib) * 1024))]
    conn.send_headers(1, headers, end_stream=True)
    sock.sendall(conn.data_to_send())
    while True:
        data = sock.recv(65536)
        if not data:
            print("closed")
            return
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                print(dict(ev.headers)[b":status"].decode())
                return
            if isinstance(ev, h2.events.StreamReset):
                print("reset %d" % ev.error_code)
                return
            if isinstance(ev, h2.events.ConnectionTerminated):
                print("goaway %d" % ev.error_code)
                return
        sock.sendall(conn.data_to_send())


def httpx_requests(url, n, ca=None, sni=None):
    import ssl

    import httpx

    if url.startswith("https://"):
        verify = ssl.create_default_context(cafile=ca)
        client = httpx.Client(http2=True, verify=verify)
        ext = {"sni_hostname": sni}
    else:
        client = httpx.Client(http1=False, http2=True)
        ext = {}
    with client:
        for _ in range(int(n)):
            r = client.get(url, extensions=ext)
            assert r.http_version == "HTTP/2", r.http_version
            print(r.status_code, r.text)


if __name__ == "__main__":
    if sys.argv[1] == "h2":
        h2_requests(*sys.argv[2:])
    elif sys.argv[1] == "big":
        big_header(*sys.argv[2:])
    else:
        httpx_requests(*sys.argv[2:])
