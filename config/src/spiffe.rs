//! SPIFFE IDs and trust domains, parsed and validated per the SPIFFE ID specification.
//!
//! Defined here, in the lowest crate, so config validation (route `peer` matches, expected
//! upstream IDs, trust bundle domains) and the dataplane's verifiers share one parser.

use std::fmt;

/// Longest SPIFFE ID accepted (the spec's URI limit).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name accepted (the spec's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("does not start with \"spiffe://\" (the scheme is lowercase)")]
    Scheme,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} characters")]
    TrustDomainTooLong,
    #[error(
        "character {0:?} is not allowed in a trust domain (lowercase letters, digits, '.', '-', \
         '_'; no port, no user info)"
    )]
    TrustDomainChar(char),
    #[error("the ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("empty path segment (a \"//\" or a trailing '/')")]
    EmptySegment,
    #[error("path segment \".\" or \"..\"")]
    DotSegment,
    #[error(
        "character {0:?} is not allowed in a path (letters, digits, '.', '-', '_'; no query, \
         fragment or percent-encoding)"
    )]
    PathChar(char),
}

/// A SPIFFE trust domain, e.g. `example.test`: `[a-z0-9._-]{1,255}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (no scheme). `spiffe://example.test` is accepted too.
    pub fn new(name: &str) -> Result<TrustDomain, SpiffeIdError> {
        let name = name.strip_prefix("spiffe://").unwrap_or(name);
        check_trust_domain(name)?;
        Ok(TrustDomain(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<domain>`, the ID of the trust domain itself.
    pub fn id_string(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_trust_domain(name: &str) -> Result<(), SpiffeIdError> {
    if name.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(SpiffeIdError::TrustDomainChar(c));
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    Ok(())
}

/// A SPIFFE ID `spiffe://<trust domain>[/<path>]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// End of the trust domain in `id`.
    domain_end: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID per the SPIFFE ID specification.
    pub fn parse(text: &str) -> Result<SpiffeId, SpiffeIdError> {
        if text.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or(SpiffeIdError::Scheme)?;
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(domain)?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if segment.is_empty() {
                    return Err(SpiffeIdError::EmptySegment);
                }
                if segment == "." || segment == ".." {
                    return Err(SpiffeIdError::DotSegment);
                }
                if let Some(c) = segment
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                {
                    return Err(SpiffeIdError::PathChar(c));
                }
            }
        }
        Ok(SpiffeId {
            id: text.to_owned(),
            domain_end: "spiffe://".len() + domain.len(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain name, e.g. `example.test`.
    pub fn trust_domain_name(&self) -> &str {
        &self.id["spiffe://".len()..self.domain_end]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, e.g. `/ns/prod/sa/web`; empty for the trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.id[self.domain_end..]
    }

    /// Whether the path is `prefix` or below it, segment-wise: `/ns/prod` matches
    /// `/ns/prod` and `/ns/prod/sa/web` but not `/ns/production`. `/` matches every path.
    pub fn path_has_prefix(&self, prefix: &str) -> bool {
        let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
        match self.path().strip_prefix(prefix) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.id)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_per_the_spec() {
        let id = SpiffeId::parse("spiffe://example.test/ns/prod/sa/web").unwrap_or_else(|e| {
            panic!("{e}");
        });
        assert_eq!(id.trust_domain_name(), "example.test");
        assert_eq!(id.path(), "/ns/prod/sa/web");
        assert!(id.path_has_prefix("/ns/prod"));
        assert!(id.path_has_prefix("/ns/prod/"));
        assert!(id.path_has_prefix("/"));
        assert!(!id.path_has_prefix("/ns/pro"));
        let bare = SpiffeId::parse("spiffe://example.test").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bare.path(), "");
        for (text, want) in [
            ("http://example.test/a", SpiffeIdError::Scheme),
            ("SPIFFE://example.test/a", SpiffeIdError::Scheme),
            ("spiffe:///a", SpiffeIdError::EmptyTrustDomain),
            (
                "spiffe://Example.test/a",
                SpiffeIdError::TrustDomainChar('E'),
            ),
            (
                "spiffe://example.test:8443/a",
                SpiffeIdError::TrustDomainChar(':'),
            ),
            (
                "spiffe://user@example.test/a",
                SpiffeIdError::TrustDomainChar('@'),
            ),
            ("spiffe://example.test/a//b", SpiffeIdError::EmptySegment),
            ("spiffe://example.test/a/", SpiffeIdError::EmptySegment),
            ("spiffe://example.test/", SpiffeIdError::EmptySegment),
            ("spiffe://example.test/a/../b", SpiffeIdError::DotSegment),
            ("spiffe://example.test/a?x=1", SpiffeIdError::PathChar('?')),
            ("spiffe://example.test/a#f", SpiffeIdError::PathChar('#')),
            ("spiffe://example.test/a%20b", SpiffeIdError::PathChar('%')),
            (
                "spiffe://example.test?x",
                SpiffeIdError::TrustDomainChar('?'),
            ),
        ] {
            assert_eq!(SpiffeId::parse(text), Err(want), "{text}");
        }
        let long = format!("spiffe://example.test/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert_eq!(SpiffeId::parse(&long), Err(SpiffeIdError::TooLong));
        assert_eq!(
            TrustDomain::new(&"a".repeat(256)),
            Err(SpiffeIdError::TrustDomainTooLong)
        );
        assert_eq!(
            TrustDomain::new("spiffe://other.test").map(|d| d.to_string()),
            Ok("other.test".to_owned())
        );
    }
}
