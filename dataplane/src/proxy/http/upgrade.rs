//! HTTP/1.1 protocol upgrades (WebSocket): `Upgrade` passthrough and the byte relay after
//! `101 Switching Protocols`.
//!
//! Where it sits: [`super::plan`] asks [`allowed`] whether a request may keep its `Upgrade`
//! field (HTTP/1.1 client, `Connection: upgrade`, one protocol listed in the route's
//! `upgrades`, no request body; `h2c` never); only then is the request sent upstream with
//! `Connection: upgrade`. The response relay hands a `101` to [`switched`], which writes it to
//! the client; [`super::forward`] then runs [`tunnel`]: both connections become a raw byte
//! relay (`proxy::relay::pump`, the TCP path's loop) with the listener's idle timeout, and the
//! upstream connection never returns to the pool. Any other answer is an ordinary response.
//!
//! A request that is not an upgrade costs one flag test here.

use std::time::Duration;

use crate::error::ProxyError;
use crate::http1::{Framing, RequestHead, ResponseEdits, ResponseHead, encode_response};
use crate::metrics::ClusterStats;
use crate::pool::UpConn;
use crate::proxy::http_io::{HttpRead, HttpWrite};
use crate::proxy::relay::{self, Idle};
use crate::rt::IoBuf;

use super::{ClientOut, Conn, EditSet, ExShared, Meters, RespCtx, RespFail, RespOk, UpFail};

/// Which of `route_upgrades` the request in `buf` switches to, if it may: an HTTP/1.1 upgrade
/// request for exactly one protocol, listed by the route, without a body.
pub(super) fn allowed<'r>(
    route_upgrades: &'r [String],
    head: &RequestHead,
    buf: &[u8],
) -> Option<&'r str> {
    if !head.is_upgrade() || route_upgrades.is_empty() || head.framing() != Framing::None {
        return None;
    }
    let wanted = head.upgrade(buf)?;
    let wanted = wanted.trim_ascii();
    if wanted.contains(&b',') {
        return None;
    }
    route_upgrades
        .iter()
        .find(|p| p.as_bytes().eq_ignore_ascii_case(wanted))
        .map(String::as_str)
}

/// The upstream answered an upgrade request with `101`: check that it switched to the protocol
/// asked for, write the 101 (and any bytes of the new protocol that came with it) to the
/// client. Any other 101 is a protocol error (502).
pub(super) async fn switched<W: ClientOut>(
    down: &mut W,
    head: &ResponseHead,
    rbuf: &mut Vec<u8>,
    consumed: usize,
    cx: &RespCtx<'_>,
    shared: &ExShared,
    meters: &Meters<'_>,
) -> Result<RespOk, RespFail> {
    let protocol = cx.upgrade.unwrap_or_default();
    let agreed = head
        .upgrade(rbuf)
        .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(protocol.as_bytes()));
    if !agreed {
        tracing::debug!(protocol, "upstream switched to another protocol than asked");
        return Err(RespFail::Upstream(UpFail::Protocol));
    }
    let mut out = Vec::with_capacity(head.head_len() + 64 + rbuf.len() - consumed);
    let edits = EditSet::new(cx.edits);
    let encoded = encode_response(
        head,
        rbuf,
        &ResponseEdits {
            headers: edits.headers(),
            framing: None,
            // Mirrors the 101: `Connection: upgrade` and its Upgrade field.
            connection: None,
        },
        &mut out,
    );
    if let Err(e) = encoded {
        tracing::error!(error = %e, "cannot encode the 101 response");
        return Err(RespFail::Upstream(UpFail::Protocol));
    }
    // Bytes of the new protocol the upstream sent right behind its 101.
    out.extend_from_slice(&rbuf[consumed..]);
    rbuf.clear();
    shared.status.set(101);
    shared.responded.set(true);
    let n = out.len();
    let (res, _) = down.raw_owned(out).await;
    res.map_err(|_| RespFail::ClientGone)?;
    meters.client_out(n);
    Ok(RespOk {
        status: 101,
        keep_down: false,
        upstream_reusable: false,
        upgraded: true,
    })
}

/// Relay bytes both ways between the client and the upstream after a 101, until both sides
/// closed, an error, or neither sent anything for `idle_timeout`. Client bytes that arrived
/// before the switch (pipelined behind the request) go first.
pub(super) async fn tunnel<R: HttpRead, W: ClientOut>(
    conn: &mut Conn<R, W>,
    up: &mut UpConn,
    idle_timeout: Duration,
    cluster: &ClusterStats,
    meters: &Meters<'_>,
) -> Result<(), ProxyError> {
    let ex = meters.ex;
    if !conn.buf.is_empty() {
        let early = std::mem::take(&mut conn.buf);
        let (res, _) = up.wr.write_all_owned(early).await;
        res.map_err(|e| ProxyError::io(crate::error::Blame::Upstream, e))?;
    }
    conn.buf = Vec::new();
    let idle = Idle::new(idle_timeout);
    let to_upstream = relay::pump(
        &mut conn.rd,
        &mut up.wr,
        crate::error::Blame::Downstream,
        [&meters.listener.bytes_in, &cluster.bytes_sent],
        &ex.received,
        &idle,
    );
    let to_client = relay::pump(
        &mut up.rd,
        ToClient(&mut conn.wr),
        crate::error::Blame::Upstream,
        [&cluster.bytes_received, &meters.listener.bytes_out],
        &ex.sent,
        &idle,
    );
    let both = std::pin::pin!(relay::both_or_first_error(to_upstream, to_client));
    relay::with_idle_clock(both, &idle).await
}

/// The client side as a plain byte sink (HTTP/1 only: after a 101 the connection is no longer
/// HTTP).
struct ToClient<'a, W>(&'a mut W);

impl<W: ClientOut> HttpWrite for ToClient<'_, W> {
    async fn write_all_owned<B: IoBuf>(&mut self, buf: B) -> (std::io::Result<()>, B) {
        self.0.raw_owned(buf).await
    }
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.body(buf, false).await.map(drop)
    }
    async fn shutdown_write(&mut self) -> std::io::Result<()> {
        self.0.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::{Limits, Parsed, parse_request};

    fn allowed_for(request: &str, route: &[&str]) -> Option<String> {
        let route: Vec<String> = route.iter().map(|s| (*s).to_owned()).collect();
        let buf = request.as_bytes();
        let Ok(Parsed::Complete { head, .. }) = parse_request(buf, &Limits::default()) else {
            panic!("parse {request:?}");
        };
        allowed(&route, &head, buf).map(str::to_owned)
    }

    #[test]
    fn only_single_allowed_protocols_without_a_body_upgrade() {
        let ws = "GET / HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\nupgrade: WebSocket\r\n\r\n";
        assert_eq!(
            allowed_for(ws, &["websocket"]).as_deref(),
            Some("websocket")
        );
        assert_eq!(allowed_for(ws, &[]), None);
        assert_eq!(allowed_for(ws, &["x-other"]), None);
        // Without `Connection: upgrade`, in HTTP/1.0, with several protocols or a body: no.
        let cases = [
            "GET / HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\n\r\n",
            "GET / HTTP/1.0\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket, x-other\r\n\r\n",
            "POST / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\ncontent-length: 1\r\n\r\nx",
            "GET / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
        ];
        for request in cases {
            assert_eq!(
                allowed_for(request, &["websocket", "x-other"]),
                None,
                "{request}"
            );
        }
    }
}
