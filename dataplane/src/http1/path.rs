//! Path normalisation: the one form of a request path that routing and authorization see.

use std::borrow::Cow;

use super::error::{H1Error, Violation};

/// Split an origin-form target into path and query (without the `?`).
pub fn split_query(target: &[u8]) -> (&[u8], Option<&[u8]>) {
    match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], Some(&target[i + 1..])),
        None => (target, None),
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A byte allowed raw in a path: printable ASCII except the delimiters that cannot be in a
/// path (`?` ends it, `#` is never sent) and backslash (some origins read it as `/`).
fn is_path_byte(b: u8) -> bool {
    (b'!'..=b'~').contains(&b) && !matches!(b, b'?' | b'#' | b'\\')
}

/// What `%XY` becomes: decoded (unreserved), kept (upper-cased), or refused.
enum Escape {
    Decode(u8),
    Keep(u8, u8),
}

fn escape(hi: u8, lo: u8) -> Result<Escape, Violation> {
    let (Some(h), Some(l)) = (hex(hi), hex(lo)) else {
        return Err(Violation::InvalidPercentEncoding);
    };
    let b = h << 4 | l;
    match b {
        b'/' | b'\\' => Err(Violation::EncodedSeparator),
        0 => Err(Violation::EncodedNul),
        _ if is_unreserved(b) => Ok(Escape::Decode(b)),
        _ => Ok(Escape::Keep(
            hi.to_ascii_uppercase(),
            lo.to_ascii_uppercase(),
        )),
    }
}

/// Normalise the path of an origin-form target (anything from `?` on is ignored; see
/// [`split_query`]): percent-decoding of unreserved characters only (other escapes are kept,
/// upper-cased), dot-segment removal (RFC 3986 §5.2.4; `..` never climbs above `/`), and
/// repeated slashes merged. An empty path is `/`.
///
/// Refused (400): encoded `/` or `\` (`%2F`, `%5C`: a path that means different things to
/// meshgate and the origin), encoded NUL, malformed escapes, raw backslash, bytes that are
/// not printable ASCII, and paths not starting with `/`.
///
/// Already-normal paths (the usual case) are borrowed, not copied.
pub fn normalize_path(target: &[u8]) -> Result<Cow<'_, str>, H1Error> {
    normalize(split_query(target).0).map_err(H1Error::Request)
}

fn normalize(path: &[u8]) -> Result<Cow<'_, str>, Violation> {
    if path.is_empty() {
        return Ok(Cow::Borrowed("/"));
    }
    if path[0] != b'/' {
        return Err(Violation::InvalidPath);
    }
    if is_normal(path)? {
        // Checked: printable ASCII only.
        return std::str::from_utf8(path)
            .map(Cow::Borrowed)
            .map_err(|_| Violation::InvalidPath);
    }
    let mut out = String::with_capacity(path.len());
    let mut segments = path[1..].split(|&b| b == b'/').peekable();
    while let Some(seg) = segments.next() {
        let is_last = segments.peek().is_none();
        let mark = out.len();
        out.push('/');
        decode_segment(seg, &mut out)?;
        match &out.as_bytes()[mark + 1..] {
            b"" | b"." => out.truncate(mark),
            b".." => {
                out.truncate(mark);
                let parent = out.rfind('/').unwrap_or(0);
                out.truncate(parent);
            }
            _ => continue,
        }
        if is_last {
            out.push('/');
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

fn decode_segment(seg: &[u8], out: &mut String) -> Result<(), Violation> {
    let mut i = 0;
    while let Some(&b) = seg.get(i) {
        if b == b'%' {
            let (Some(&hi), Some(&lo)) = (seg.get(i + 1), seg.get(i + 2)) else {
                return Err(Violation::InvalidPercentEncoding);
            };
            match escape(hi, lo)? {
                Escape::Decode(c) => out.push(char::from(c)),
                Escape::Keep(h, l) => {
                    out.push('%');
                    out.push(char::from(h));
                    out.push(char::from(l));
                }
            }
            i += 3;
        } else if is_path_byte(b) {
            out.push(char::from(b));
            i += 1;
        } else {
            return Err(Violation::InvalidPath);
        }
    }
    Ok(())
}

/// Validate `path` and say whether it is already normal (no copy needed).
fn is_normal(path: &[u8]) -> Result<bool, Violation> {
    let mut normal = true;
    let mut i = 0;
    let mut seg_start = 1;
    while i < path.len() {
        let b = path[i];
        if b == b'/' {
            if i > 0 {
                let seg = &path[seg_start..i];
                if seg.is_empty() || seg == b"." || seg == b".." {
                    normal = false;
                }
            }
            seg_start = i + 1;
            i += 1;
        } else if b == b'%' {
            let (Some(&hi), Some(&lo)) = (path.get(i + 1), path.get(i + 2)) else {
                return Err(Violation::InvalidPercentEncoding);
            };
            match escape(hi, lo)? {
                Escape::Decode(_) => normal = false,
                Escape::Keep(h, l) => normal &= h == hi && l == lo,
            }
            i += 3;
        } else if is_path_byte(b) {
            i += 1;
        } else {
            return Err(Violation::InvalidPath);
        }
    }
    let last = &path[seg_start.min(path.len())..];
    if last == b"." || last == b".." {
        normal = false;
    }
    Ok(normal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, Violation> {
        normalize_path(p.as_bytes())
            .map(|c| c.into_owned())
            .map_err(|e| e.violation())
    }

    #[test]
    fn rfc3986_dot_segments_and_slashes() {
        let cases = [
            ("/", "/"),
            ("", "/"),
            ("/a/b/c", "/a/b/c"),
            ("/a/b/c/", "/a/b/c/"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/b/../../..", "/"),
            ("//a///b//", "/a/b/"),
            ("/a/.../b", "/a/.../b"),
            ("/a/..b/c", "/a/..b/c"),
            ("/./", "/"),
            ("/a//..", "/"),
            ("/mid/content=5/../6", "/mid/6"),
            ("/a/b?x=/../y", "/a/b"),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn percent_decoding_of_unreserved_only() {
        let cases = [
            ("/%61%62c", "/abc"),
            ("/%7E%2d%2E%5f", "/~-._"),
            ("/%2e%2e/admin", "/admin"),
            ("/a/%2E%2E/b", "/b"),
            ("/a/%2e/b", "/a/b"),
            ("/a%20b", "/a%20b"),
            ("/a%2ab", "/a%2Ab"),
            ("/%25", "/%25"),
            ("/%C3%A9", "/%C3%A9"),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn refused_paths() {
        let cases = [
            ("/a%2Fb", Violation::EncodedSeparator),
            ("/a%2fb", Violation::EncodedSeparator),
            ("/a%5Cb", Violation::EncodedSeparator),
            ("/a%5cb", Violation::EncodedSeparator),
            ("/a%00b", Violation::EncodedNul),
            ("/a%", Violation::InvalidPercentEncoding),
            ("/a%4", Violation::InvalidPercentEncoding),
            ("/a%zz", Violation::InvalidPercentEncoding),
            ("/a\\b", Violation::InvalidPath),
            ("/a b", Violation::InvalidPath),
            ("/a#b", Violation::InvalidPath),
            ("a/b", Violation::InvalidPath),
            ("/caf\u{e9}", Violation::InvalidPath),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input), Err(want), "{input}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/index.html",
            "/api/v1/items/42",
            "/a%20b",
            "/a-b_c~d",
            "/x?q=/../",
        ] {
            assert!(
                matches!(normalize_path(p.as_bytes()), Ok(Cow::Borrowed(_))),
                "{p}"
            );
        }
        for p in ["//a", "/a/", "/a/./b", "/%61", "/a%2a"] {
            let got = normalize_path(p.as_bytes());
            if p == "/a/" {
                assert!(matches!(got, Ok(Cow::Borrowed(_))), "{p}");
            } else {
                assert!(matches!(got, Ok(Cow::Owned(_))), "{p}");
            }
        }
    }

    #[test]
    fn idempotent() {
        for p in ["/a/../b//c/./%2e%2E/d%20", "/../x/", "/%7e/./"] {
            let once = norm(p).unwrap_or_default();
            assert_eq!(norm(&once).as_deref(), Ok(once.as_str()), "{p}");
        }
    }
}
