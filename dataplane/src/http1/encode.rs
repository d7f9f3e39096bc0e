//! Writing heads: a parsed head plus route-action edits -> bytes for the other side.
//!
//! Hop-by-hop fields never cross meshgate: Connection, Keep-Alive, Proxy-Connection, TE,
//! Trailer, Upgrade (re-written only when upgrading), every field the Connection field
//! names, and the framing fields (Content-Length, Transfer-Encoding), which are written from
//! the framing the proxy chose. Requests always go out as HTTP/1.1 with Host first.

use super::error::{H1Error, Violation};
use super::fields::{
    FieldList, Known, MAX_CONNECTION_OPTIONS, Span, classify, is_token, is_value_byte, list_items,
    valid_authority,
};
use super::{Framing, RequestHead, ResponseHead, TargetForm, Version};

/// Header edits from route actions, applied to the fields of the parsed head.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeaderEdits<'e> {
    /// Drop every field with one of these names (case-insensitive).
    pub remove: &'e [&'e str],
    /// Replace: drop every field with this name, then write this one.
    pub set: &'e [(&'e str, &'e [u8])],
    /// Append this field (existing ones of the same name are kept).
    pub add: &'e [(&'e str, &'e [u8])],
}

/// What to write as the Connection field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionHeader {
    /// Nothing: HTTP/1.1 connections persist by default.
    Persist,
    /// `Connection: keep-alive`, for an HTTP/1.0 peer that asked for persistence.
    KeepAlive,
    /// `Connection: close`.
    Close,
    /// `Connection: upgrade` and the head's Upgrade field.
    Upgrade,
}

impl ConnectionHeader {
    /// The field for a message to a peer that speaks `version`, keeping the connection open
    /// or not.
    pub fn for_peer(version: Version, keep_alive: bool) -> Self {
        match (keep_alive, version) {
            (false, _) => ConnectionHeader::Close,
            (true, Version::Http11) => ConnectionHeader::Persist,
            (true, Version::Http10) => ConnectionHeader::KeepAlive,
        }
    }
}

/// Edits to a request on its way upstream.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestEdits<'e> {
    pub headers: HeaderEdits<'e>,
    /// New path and query, origin-form (after a prefix rewrite, or the normalised path).
    pub path: Option<&'e [u8]>,
    /// New Host value (host rewrite).
    pub host: Option<&'e [u8]>,
    /// Body framing to declare; `None` keeps the received one. `CloseDelimited` writes none.
    pub framing: Option<Framing>,
    /// `None` mirrors the request: upgrade if it is one, close if the client closes.
    pub connection: Option<ConnectionHeader>,
}

/// Edits to a response on its way downstream.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseEdits<'e> {
    pub headers: HeaderEdits<'e>,
    /// Body framing to declare; `None` keeps the received one. `CloseDelimited` forces
    /// `Connection: close` (unless upgrading).
    pub framing: Option<Framing>,
    /// `None` mirrors the response (upgrade for a 101, close if the upstream closes).
    pub connection: Option<ConnectionHeader>,
}

/// Fields a route action may not add, set or remove: the codec writes them from framing,
/// connection management and the effective host. Config validation should call this too.
pub fn is_managed_header(name: &str) -> bool {
    matches!(
        classify(name.as_bytes()),
        Known::Host
            | Known::ContentLength
            | Known::TransferEncoding
            | Known::Connection
            | Known::KeepAlive
            | Known::ProxyConnection
            | Known::Upgrade
    )
}

fn check_edits(edits: &HeaderEdits<'_>) -> Result<(), H1Error> {
    for (name, value) in edits.set.iter().chain(edits.add.iter()) {
        if !is_token(name.as_bytes()) {
            return Err(H1Error::Edit(Violation::InvalidHeaderName));
        }
        if is_managed_header(name) {
            return Err(H1Error::Edit(Violation::ManagedHeader));
        }
        if !value.iter().all(|&b| is_value_byte(b)) {
            return Err(H1Error::Edit(Violation::InvalidHeaderValue));
        }
    }
    Ok(())
}

/// Append the upstream request head for `head` (parsed from `buf`) with `edits` to `out`.
/// On error nothing is appended.
pub fn encode_request(
    head: &RequestHead,
    buf: &[u8],
    edits: &RequestEdits<'_>,
    out: &mut Vec<u8>,
) -> Result<(), H1Error> {
    check_edits(&edits.headers)?;
    if let Some(path) = edits.path
        && !(path.starts_with(b"/")
            && path
                .iter()
                .all(|&b| (b'!'..=b'~').contains(&b) && b != b'#'))
    {
        return Err(H1Error::Edit(Violation::InvalidPath));
    }
    if let Some(host) = edits.host
        && (host.is_empty() || !valid_authority(host, false))
    {
        return Err(H1Error::Edit(Violation::InvalidHost));
    }
    let connection = edits.connection.unwrap_or(if head.is_upgrade() {
        ConnectionHeader::Upgrade
    } else if head.keep_alive() {
        ConnectionHeader::Persist
    } else {
        ConnectionHeader::Close
    });
    if connection == ConnectionHeader::Upgrade && !head.is_upgrade() {
        return Err(H1Error::Edit(Violation::NoUpgrade));
    }

    out.extend_from_slice(head.method_bytes(buf));
    out.push(b' ');
    match (edits.path, head.target_form()) {
        (Some(path), _) => out.extend_from_slice(path),
        (None, TargetForm::Absolute) => {
            let path = head.path_bytes(buf);
            if !path.starts_with(b"/") {
                out.push(b'/');
            }
            out.extend_from_slice(path);
        }
        (None, TargetForm::Origin | TargetForm::Asterisk) => {
            out.extend_from_slice(head.path_bytes(buf));
        }
        (None, TargetForm::Authority) => out.extend_from_slice(head.target_bytes(buf)),
    }
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    let host = match edits.host {
        Some(h) => h,
        None => head.host_bytes(buf),
    };
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\n");
    write_fields(
        head.fields(),
        buf,
        head.conn_nominates(),
        Strip {
            host: true,
            expect: head.version() == Version::Http10,
        },
        &edits.headers,
        out,
    );
    write_framing(edits.framing.unwrap_or(head.framing()), out);
    write_connection(connection, head.upgrade_span(), buf, out);
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// Append the downstream response head for `head` (parsed from `buf`) with `edits` to `out`.
/// On error nothing is appended.
pub fn encode_response(
    head: &ResponseHead,
    buf: &[u8],
    edits: &ResponseEdits<'_>,
    out: &mut Vec<u8>,
) -> Result<(), H1Error> {
    check_edits(&edits.headers)?;
    let framing = edits.framing.unwrap_or(head.framing());
    let mut connection = edits.connection.unwrap_or(if head.upgrade(buf).is_some() {
        ConnectionHeader::Upgrade
    } else if head.keep_alive() {
        ConnectionHeader::Persist
    } else {
        ConnectionHeader::Close
    });
    if connection == ConnectionHeader::Upgrade && head.upgrade(buf).is_none() {
        return Err(H1Error::Edit(Violation::NoUpgrade));
    }
    if framing == Framing::CloseDelimited && connection != ConnectionHeader::Upgrade {
        connection = ConnectionHeader::Close;
    }

    out.extend_from_slice(b"HTTP/1.1 ");
    write_decimal(u64::from(head.status()), out);
    out.push(b' ');
    out.extend_from_slice(head.reason(buf));
    out.extend_from_slice(b"\r\n");
    write_fields(
        head.fields(),
        buf,
        head.conn_nominates(),
        Strip {
            host: false,
            expect: false,
        },
        &edits.headers,
        out,
    );
    match (framing, head.content_length()) {
        // HEAD and 304: Content-Length describes the body not sent; keep it.
        (Framing::None, Some(n)) if !head.is_tunnel() => {
            out.extend_from_slice(b"Content-Length: ");
            write_decimal(n, out);
            out.extend_from_slice(b"\r\n");
        }
        _ => write_framing(framing, out),
    }
    write_connection(connection, head.upgrade_span(), buf, out);
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// Which fields besides the always-stripped ones to drop.
#[derive(Clone, Copy)]
struct Strip {
    host: bool,
    expect: bool,
}

fn write_fields(
    fields: &FieldList,
    buf: &[u8],
    conn_nominates: bool,
    strip: Strip,
    edits: &HeaderEdits<'_>,
    out: &mut Vec<u8>,
) {
    let named =
        |list: &[&str], name: &[u8]| list.iter().any(|n| n.as_bytes().eq_ignore_ascii_case(name));
    let set = |name: &[u8]| {
        edits
            .set
            .iter()
            .any(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
    };
    let nominated = conn_nominates.then(|| Nominated::collect(fields, buf));
    for f in fields.iter() {
        let name = f.name.get(buf);
        let keep = match classify(name) {
            Known::ContentLength
            | Known::TransferEncoding
            | Known::Connection
            | Known::KeepAlive
            | Known::ProxyConnection
            | Known::Te
            | Known::Trailer
            | Known::Upgrade => false,
            Known::Host => !strip.host,
            Known::Expect => !strip.expect,
            Known::Other => true,
        };
        if !keep
            || (!edits.remove.is_empty() && named(edits.remove, name))
            || (!edits.set.is_empty() && set(name))
            || nominated.as_ref().is_some_and(|n| n.contains(name))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(f.value.get(buf));
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in edits.set.iter().chain(edits.add.iter()) {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
}

/// The field names listed in the Connection fields (at most [`MAX_CONNECTION_OPTIONS`], which
/// the parser enforces), collected once so that filtering costs O(fields x options).
struct Nominated<'b> {
    names: [&'b [u8]; MAX_CONNECTION_OPTIONS],
    len: usize,
}

impl<'b> Nominated<'b> {
    fn collect(fields: &FieldList, buf: &'b [u8]) -> Self {
        let mut set = Nominated {
            names: [&[]; MAX_CONNECTION_OPTIONS],
            len: 0,
        };
        for f in fields.iter() {
            if classify(f.name.get(buf)) != Known::Connection {
                continue;
            }
            for item in list_items(f.value.get(buf)) {
                if let Some(slot) = set.names.get_mut(set.len)
                    && !item.is_empty()
                {
                    *slot = item;
                    set.len += 1;
                }
            }
        }
        set
    }

    fn contains(&self, name: &[u8]) -> bool {
        self.names[..self.len]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
    }
}

fn write_framing(framing: Framing, out: &mut Vec<u8>) {
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            write_decimal(n, out);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::None | Framing::CloseDelimited => {}
    }
}

fn write_connection(connection: ConnectionHeader, upgrade: Span, buf: &[u8], out: &mut Vec<u8>) {
    match connection {
        ConnectionHeader::Persist => {}
        ConnectionHeader::KeepAlive => out.extend_from_slice(b"Connection: keep-alive\r\n"),
        ConnectionHeader::Close => out.extend_from_slice(b"Connection: close\r\n"),
        ConnectionHeader::Upgrade => {
            out.extend_from_slice(b"Connection: upgrade\r\nUpgrade: ");
            out.extend_from_slice(upgrade.get(buf));
            out.extend_from_slice(b"\r\n");
        }
    }
}

fn write_decimal(mut n: u64, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}
