//! SPIFFE IDs and trust domain names, validated per the SPIFFE ID specification
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>).
//!
//! Sans-IO: plain parsing over strings. Every identity that enters the CA (CLI flags, join tokens,
//! CSRs) goes through [`SpiffeId::parse`]; a value of type [`SpiffeId`] is always valid.

use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE ID accepted (the spec's limit for URI SANs).
pub const MAX_ID_LEN: usize = 2048;
/// The longest trust domain name accepted (the spec's DNS-like limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a SPIFFE ID or trust domain was refused. Each message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty; expected spiffe://<trust-domain>/<path>")]
    Empty,
    #[error("{input:?} does not start with \"spiffe://\"; expected spiffe://<trust-domain>/<path>")]
    Scheme { input: String },
    #[error("{input:?} has no trust domain; expected spiffe://<trust-domain>/<path>")]
    MissingTrustDomain { input: String },
    #[error("{input:?}: the trust domain must be lowercase (write {lower:?})")]
    UppercaseTrustDomain { input: String, lower: String },
    #[error("{input:?}: a port is not allowed in a SPIFFE ID's trust domain")]
    Port { input: String },
    #[error("{input:?}: user info (\"user@\") is not allowed in a SPIFFE ID")]
    UserInfo { input: String },
    #[error("{input:?}: a query (\"?...\") is not allowed in a SPIFFE ID")]
    Query { input: String },
    #[error("{input:?}: a fragment (\"#...\") is not allowed in a SPIFFE ID")]
    Fragment { input: String },
    #[error("{input:?}: percent-encoding is not allowed in a SPIFFE ID")]
    PercentEncoded { input: String },
    #[error(
        "{input:?}: trust domain characters are limited to lowercase letters, digits, '.', '-' and '_' (found {found:?})"
    )]
    TrustDomainChar { input: String, found: char },
    #[error("{input:?}: the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} characters")]
    TrustDomainTooLong { input: String },
    #[error("{input:?}: the path has an empty segment (\"//\"); remove it")]
    EmptySegment { input: String },
    #[error("{input:?}: the path has a \".\" or \"..\" segment; use the normalised path")]
    DotSegment { input: String },
    #[error("{input:?}: the path ends with \"/\"; remove the trailing slash")]
    TrailingSlash { input: String },
    #[error(
        "{input:?}: path characters are limited to letters, digits, '.', '-' and '_' between slashes (found {found:?})"
    )]
    PathChar { input: String, found: char },
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("{input:?}: a trust domain has no path; give only the name, e.g. example.org")]
    TrustDomainPath { input: String },
}

/// A SPIFFE trust domain name such as `example.org` (no scheme, no path).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Accepts `example.org` or `spiffe://example.org` (with no path).
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain {
                input: input.into(),
            });
        }
        if input.starts_with(SCHEME) {
            let id = SpiffeId::parse(input)?;
            if !id.path().is_empty() {
                return Err(SpiffeIdError::TrustDomainPath {
                    input: input.into(),
                });
            }
            return Ok(id.trust_domain().clone());
        }
        if input.contains("://") {
            return Err(SpiffeIdError::Scheme {
                input: input.into(),
            });
        }
        validate_trust_domain(input, input)?;
        Ok(TrustDomain(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>`: the trust domain's own ID, put in the CA certificate's URI SAN.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A valid SPIFFE ID: `spiffe://<trust-domain>[/<path>]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or `/seg/seg...`.
    path: String,
}

impl SpiffeId {
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        let err_input = || input.to_owned();
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if input.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let Some(rest) = input.strip_prefix(SCHEME) else {
            return Err(SpiffeIdError::Scheme { input: err_input() });
        };
        // Report the URI features the spec forbids by name, before the generic character checks.
        if input.contains('#') {
            return Err(SpiffeIdError::Fragment { input: err_input() });
        }
        if input.contains('?') {
            return Err(SpiffeIdError::Query { input: err_input() });
        }
        if input.contains('%') {
            return Err(SpiffeIdError::PercentEncoded { input: err_input() });
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(SpiffeIdError::UserInfo { input: err_input() });
        }
        if authority.contains(':') {
            return Err(SpiffeIdError::Port { input: err_input() });
        }
        if authority.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain { input: err_input() });
        }
        validate_trust_domain(authority, input)?;
        validate_path(path, input)?;
        Ok(SpiffeId {
            trust_domain: TrustDomain(authority.to_owned()),
            path: path.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        &self.trust_domain == td
    }

    /// Paths under `/meshgate/` name meshgate's own components (the enrollment server is
    /// `/meshgate/enrollment`, and agents pin it). Join tokens, enrollment and renewal never
    /// issue them; only an operator can (`meshgate cert issue`).
    pub fn is_reserved(&self) -> bool {
        self.path == "/meshgate" || self.path.starts_with("/meshgate/")
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str, input: &str) -> Result<(), SpiffeIdError> {
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong {
            input: input.into(),
        });
    }
    if td.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(SpiffeIdError::UppercaseTrustDomain {
            input: input.into(),
            lower: input.replacen(td, &td.to_ascii_lowercase(), 1),
        });
    }
    if let Some(found) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(match found {
            ':' => SpiffeIdError::Port {
                input: input.into(),
            },
            '@' => SpiffeIdError::UserInfo {
                input: input.into(),
            },
            _ => SpiffeIdError::TrustDomainChar {
                input: input.into(),
                found,
            },
        });
    }
    Ok(())
}

fn validate_path(path: &str, input: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first split element is empty and skipped.
    let segments = path.split('/').skip(1);
    let n = path.split('/').count() - 1;
    for (i, seg) in segments.enumerate() {
        if seg.is_empty() {
            return Err(if i == n - 1 {
                SpiffeIdError::TrailingSlash {
                    input: input.into(),
                }
            } else {
                SpiffeIdError::EmptySegment {
                    input: input.into(),
                }
            });
        }
        if seg == "." || seg == ".." {
            return Err(SpiffeIdError::DotSegment {
                input: input.into(),
            });
        }
        if let Some(found) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(SpiffeIdError::PathChar {
                input: input.into(),
                found,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for ok in [
            "spiffe://example.org",
            "spiffe://example.org/ns/prod/sa/web",
            "spiffe://my_td-1.example/a.b-c_D/E9",
            "spiffe://td/..a/a..",
        ] {
            let id = SpiffeId::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(id.to_string(), ok);
        }
        let id = SpiffeId::parse("spiffe://example.org/web").expect("valid");
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/web");
    }

    #[test]
    fn refuses_each_invalid_form_with_its_own_reason() {
        use SpiffeIdError as E;
        type Check = fn(&SpiffeIdError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, E::Empty)),
            ("http://example.org/a", |e| matches!(e, E::Scheme { .. })),
            ("SPIFFE://example.org/a", |e| matches!(e, E::Scheme { .. })),
            ("example.org/a", |e| matches!(e, E::Scheme { .. })),
            ("spiffe:///a", |e| matches!(e, E::MissingTrustDomain { .. })),
            ("spiffe://", |e| matches!(e, E::MissingTrustDomain { .. })),
            ("spiffe://Example.org/a", |e| {
                matches!(e, E::UppercaseTrustDomain { .. })
            }),
            ("spiffe://example.org:8443/a", |e| {
                matches!(e, E::Port { .. })
            }),
            ("spiffe://user@example.org/a", |e| {
                matches!(e, E::UserInfo { .. })
            }),
            ("spiffe://example.org/a?x=1", |e| {
                matches!(e, E::Query { .. })
            }),
            ("spiffe://example.org/a#frag", |e| {
                matches!(e, E::Fragment { .. })
            }),
            ("spiffe://example.org/a%20b", |e| {
                matches!(e, E::PercentEncoded { .. })
            }),
            ("spiffe://exa mple.org/a", |e| {
                matches!(e, E::TrustDomainChar { found: ' ', .. })
            }),
            ("spiffe://example.org//a", |e| {
                matches!(e, E::EmptySegment { .. })
            }),
            ("spiffe://example.org/a/", |e| {
                matches!(e, E::TrailingSlash { .. })
            }),
            ("spiffe://example.org/", |e| {
                matches!(e, E::TrailingSlash { .. })
            }),
            ("spiffe://example.org/a/./b", |e| {
                matches!(e, E::DotSegment { .. })
            }),
            ("spiffe://example.org/a/..", |e| {
                matches!(e, E::DotSegment { .. })
            }),
            ("spiffe://example.org/a b", |e| {
                matches!(e, E::PathChar { found: ' ', .. })
            }),
            ("spiffe://example.org/ü", |e| {
                matches!(e, E::PathChar { found: 'ü', .. })
            }),
        ];
        for (input, check) in cases {
            match SpiffeId::parse(input) {
                Ok(id) => panic!("{input:?} accepted as {id}"),
                Err(e) => assert!(check(&e), "{input:?}: unexpected error {e:?}"),
            }
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_ID_LEN));
        assert_eq!(SpiffeId::parse(&long), Err(E::TooLong));
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(
            TrustDomain::parse("example.org").expect("bare").as_str(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::parse("spiffe://example.org")
                .expect("scheme")
                .as_str(),
            "example.org"
        );
        assert!(TrustDomain::parse("spiffe://example.org/path").is_err());
        assert!(TrustDomain::parse("Example.org").is_err());
        assert!(TrustDomain::parse("example.org:443").is_err());
        assert!(TrustDomain::parse("https://example.org").is_err());
        assert!(TrustDomain::parse("").is_err());
        assert!(TrustDomain::parse(&"a".repeat(256)).is_err());
        assert_eq!(
            TrustDomain::parse("td").expect("short").id_string(),
            "spiffe://td"
        );
    }

    #[test]
    fn membership_and_serde_roundtrip() {
        let td = TrustDomain::parse("example.org").expect("td");
        let id = SpiffeId::parse("spiffe://example.org/web").expect("id");
        assert!(id.is_member_of(&td));
        assert!(
            !SpiffeId::parse("spiffe://other.org/web")
                .expect("id")
                .is_member_of(&td)
        );
        let json = serde_json::to_string(&id).expect("ser");
        assert_eq!(json, "\"spiffe://example.org/web\"");
        let back: SpiffeId = serde_json::from_str(&json).expect("de");
        assert_eq!(back, id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://example.org/a/\"").is_err());
    }
}
