//! Query-parameter conditions of a route match (`[[routes.match.query]]`).
//!
//! Only routes with query entries look at the query: a request is never split into parameters
//! otherwise. Names and values are compared percent-decoded with `+` read as a space (the
//! `application/x-www-form-urlencoded` reading browsers and frameworks use), so a client cannot
//! dodge or fake a match by encoding a parameter differently. Decoding allocates only for a
//! parameter that holds `%` or `+`; an invalid escape (`%zz`) stays as written.

use std::borrow::Cow;

use meshgate_config::QueryMatch;

use super::HeaderKind;

/// One compiled `[[routes.match.query]]` entry.
#[derive(Debug)]
pub(super) struct QueryMatcher {
    name: Box<[u8]>,
    kind: HeaderKind,
}

/// Compile a route's query entries (regexes built once per generation).
pub(super) fn compile(list: &[QueryMatch], route: &str) -> Box<[QueryMatcher]> {
    list.iter()
        .map(|q| QueryMatcher {
            name: q.name.as_bytes().into(),
            kind: HeaderKind::new(&q.value, route),
        })
        .collect()
}

/// Every entry matches `query` (the part of the target after `?`, `None` without one).
pub(super) fn all_match(matchers: &[QueryMatcher], query: Option<&[u8]>) -> bool {
    matchers.iter().all(|m| m.matches(query))
}

impl QueryMatcher {
    fn matches(&self, query: Option<&[u8]>) -> bool {
        let mut values = params(query.unwrap_or_default())
            .filter(|(name, _)| *decode(name) == *self.name)
            .map(|(_, value)| value);
        match &self.kind {
            HeaderKind::Present(want) => values.next().is_some() == *want,
            HeaderKind::Exact(want) => values.any(|v| *decode(v) == **want),
            HeaderKind::Regex(re) => values.any(|v| re.is_match(&decode(v))),
            HeaderKind::Never => false,
        }
    }
}

/// `a=1&b&c=` -> `(a, 1)`, `(b, "")`, `(c, "")`; empty pieces (`&&`) are skipped.
fn params(query: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    query
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.iter().position(|&b| b == b'=') {
            Some(i) => (&p[..i], &p[i + 1..]),
            None => (p, &p[p.len()..]),
        })
}

/// Percent-decode `s` (and `+` -> space); borrowed when there is nothing to decode.
fn decode(s: &[u8]) -> Cow<'_, [u8]> {
    if !s.iter().any(|&b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        match (
            b,
            s.get(i + 1).copied().and_then(hex),
            s.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use meshgate_config::HeaderValueMatch;

    use super::*;

    fn matcher(name: &str, value: HeaderValueMatch) -> Box<[QueryMatcher]> {
        compile(
            &[QueryMatch {
                name: name.into(),
                value,
            }],
            "test",
        )
    }

    #[test]
    fn exact_values_are_compared_decoded() {
        let m = matcher("q", HeaderValueMatch::Exact("a b/c".into()));
        for query in ["q=a+b/c", "q=a%20b%2Fc", "x=1&q=a%20b/c", "q=no&q=a+b%2fc"] {
            assert!(all_match(&m, Some(query.as_bytes())), "{query}");
        }
        for query in ["q=a%2Bb/c", "q=a b", "Q=a+b/c", "qq=a+b/c", ""] {
            assert!(!all_match(&m, Some(query.as_bytes())), "{query}");
        }
        assert!(!all_match(&m, None));
        // Encoded names match too.
        let m = matcher("a b", HeaderValueMatch::Exact("1".into()));
        assert!(all_match(&m, Some(b"a+b=1")));
        assert!(all_match(&m, Some(b"a%20b=1")));
    }

    #[test]
    fn present_absent_and_regex() {
        let present = matcher("debug", HeaderValueMatch::Present(true));
        let absent = matcher("debug", HeaderValueMatch::Present(false));
        for (query, has) in [
            (Some(&b"debug"[..]), true),
            (Some(b"x=1&debug="), true),
            (Some(b"x=1&&debug=0"), true),
            (Some(b"debugger=1"), false),
            (Some(b""), false),
            (None, false),
        ] {
            assert_eq!(all_match(&present, query), has, "{query:?}");
            assert_eq!(all_match(&absent, query), !has, "{query:?}");
        }
        let re = matcher("v", HeaderValueMatch::Regex("^[0-9]+$".into()));
        assert!(all_match(&re, Some(b"v=12")));
        assert!(all_match(&re, Some(b"v=x&v=%31%32")));
        assert!(!all_match(&re, Some(b"v=1x")));
        // Invalid escapes stay as written; bytes that are not UTF-8 do not panic.
        let raw = matcher("k", HeaderValueMatch::Exact("%zz%".into()));
        assert!(all_match(&raw, Some(b"k=%zz%")));
        assert!(!all_match(&re, Some(b"v=%ff")));
    }
}
