//! Server certificates by SNI, and the rustls configs the pipeline uses.
//!
//! - [`CertStore`]: the certificates of one `tls` listener, chosen by SNI (exact name, then a
//!   `*.` wildcard one label deep, then the default); rustls `ResolvesServerCert`. With no
//!   match and no default, rustls refuses the handshake: never plaintext, never a wrong cert.
//! - [`load_identity`]: a chain + key from PEM files, checked (key matches, dates valid) with
//!   the same rules and messages as config validation (`meshgate_config::pem`).
//! - [`provider`]: the ring `CryptoProvider` restricted to Mozilla's "intermediate" suites.
//! - [`Resumption`]: ticket keys (rotating) and a session cache, built once per process and
//!   shared by every shard's `ServerConfig`, so a session resumes on any core.
//! - [`server_config`] / [`client_config`]: listener and upstream configs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use meshgate_config::pem::{self, CertSummary, FileError};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::crypto::ring as ring_provider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SupportedProtocolVersion};

use super::spiffe::{SpiffeClientVerifier, TrustBundles, VerifyObserver};

/// Why TLS state could not be built from files and settings.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: certificate for {name:?} is also given by {other}", path = .path.display(), other = .other.display())]
    DuplicateName {
        name: String,
        path: PathBuf,
        other: PathBuf,
    },
    #[error("more than one certificate without `sni` ({first} and {second}); only one can be the default", first = .first.display(), second = .second.display())]
    TwoDefaults { first: PathBuf, second: PathBuf },
    #[error("invalid SNI pattern {0:?}: write a DNS name or \"*.\" followed by one")]
    BadPattern(String),
    #[error("no certificates")]
    Empty,
    #[error("client_auth is on but no trust bundle is configured")]
    NoTrustBundles,
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The cryptography: ring only, Mozilla "intermediate" suites (TLS 1.3: all three; TLS 1.2:
/// ECDHE with AES-GCM or ChaCha20-Poly1305, ECDSA or RSA), key exchange X25519, P-256, P-384.
pub fn provider() -> Arc<CryptoProvider> {
    use ring_provider::cipher_suite as cs;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![
            ring_provider::kx_group::X25519,
            ring_provider::kx_group::SECP256R1,
            ring_provider::kx_group::SECP384R1,
        ],
        ..ring_provider::default_provider()
    })
}

/// Lowest TLS version a listener or cluster accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinVersion {
    #[default]
    Tls12,
    Tls13,
}

impl MinVersion {
    pub fn versions(self) -> &'static [&'static SupportedProtocolVersion] {
        static BOTH: [&SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static ONLY_13: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self {
            MinVersion::Tls12 => &BOTH,
            MinVersion::Tls13 => &ONLY_13,
        }
    }
}

/// A chain + key loaded from PEM files, checked: the key matches, every certificate is valid
/// at `now`, and ring can sign with the key.
pub fn load_identity(
    cert_path: &Path,
    key_path: &Path,
    now: SystemTime,
) -> Result<(Arc<CertifiedKey>, CertSummary), TlsSetupError> {
    let (chain, key) = pem::read_identity(cert_path, key_path, now)?;
    certified_key(chain, &key).map_err(|err| {
        TlsSetupError::File(FileError {
            path: key_path.to_owned(),
            problem: format!("unusable key: {err}"),
            hint: "use an ECDSA P-256/P-384, Ed25519 or RSA key".to_owned(),
        })
    })
}

/// A `CertifiedKey` from DER (the PEM-free path, for keys made in memory).
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> Result<(Arc<CertifiedKey>, CertSummary), rustls::Error> {
    let signing_key = ring_provider::sign::any_supported_type(key)?;
    let summary = chain
        .first()
        .and_then(pem::summarize)
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(err) => return Err(err),
    }
    Ok((Arc::new(certified), summary))
}

/// One certificate of a store, as listed by `GET /certs`.
#[derive(Debug, Clone)]
pub struct StoredCert {
    pub certified: Arc<CertifiedKey>,
    pub summary: CertSummary,
    /// Names it is chosen for; empty for the default.
    pub sni: Vec<String>,
    /// Where it came from (for messages); empty for in-memory certificates.
    pub source: PathBuf,
}

/// The certificates of one listener, chosen by SNI.
#[derive(Debug, Default)]
pub struct CertStore {
    certs: Vec<StoredCert>,
    /// Lowercase exact name -> index.
    exact: HashMap<String, usize>,
    /// Lowercase parent of a `*.` pattern (`*.example.test` -> `example.test`) -> index.
    wildcard: HashMap<String, usize>,
    default: Option<usize>,
}

impl CertStore {
    pub fn new() -> CertStore {
        CertStore::default()
    }

    /// Adds a certificate for `sni` patterns (`a.example`, `*.example`). The first one without
    /// patterns is the default; if all have patterns, the first added is.
    pub fn add(&mut self, cert: StoredCert) -> Result<(), TlsSetupError> {
        let index = self.certs.len();
        let mut exact = Vec::new();
        let mut wildcard = Vec::new();
        for pattern in &cert.sni {
            let lower = pattern.to_ascii_lowercase();
            let (is_wildcard, name) = match lower.strip_prefix("*.") {
                Some(parent) => (true, parent.to_owned()),
                None => (false, lower),
            };
            if !is_dns_pattern_part(&name) {
                return Err(TlsSetupError::BadPattern(pattern.clone()));
            }
            let (table, added) = if is_wildcard {
                (&self.wildcard, &mut wildcard)
            } else {
                (&self.exact, &mut exact)
            };
            if let Some(&other) = table.get(&name) {
                return Err(TlsSetupError::DuplicateName {
                    name: pattern.clone(),
                    path: cert.source.clone(),
                    other: self.certs[other].source.clone(),
                });
            }
            added.push(name);
        }
        if cert.sni.is_empty() {
            match self.default {
                Some(first) if self.certs[first].sni.is_empty() => {
                    return Err(TlsSetupError::TwoDefaults {
                        first: self.certs[first].source.clone(),
                        second: cert.source.clone(),
                    });
                }
                _ => self.default = Some(index),
            }
        } else if self.default.is_none() {
            self.default = Some(index);
        }
        for name in exact {
            self.exact.insert(name, index);
        }
        for name in wildcard {
            self.wildcard.insert(name, index);
        }
        self.certs.push(cert);
        Ok(())
    }

    /// Loads `(cert, key, sni)` file triples at `now`.
    pub fn load<'a>(
        sources: impl IntoIterator<Item = (&'a Path, &'a Path, &'a [String])>,
        now: SystemTime,
    ) -> Result<CertStore, TlsSetupError> {
        let mut store = CertStore::new();
        for (cert, key, sni) in sources {
            let (certified, summary) = load_identity(cert, key, now)?;
            store.add(StoredCert {
                certified,
                summary,
                sni: sni.to_vec(),
                source: cert.to_owned(),
            })?;
        }
        if store.certs.is_empty() {
            return Err(TlsSetupError::Empty);
        }
        Ok(store)
    }

    /// The certificate for SNI `name` (`None`: no SNI): exact, then wildcard, then default.
    pub fn select(&self, name: Option<&str>) -> Option<&StoredCert> {
        let index = name
            .and_then(|name| {
                let name = name.strip_suffix('.').unwrap_or(name);
                let lower;
                let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                    lower = name.to_ascii_lowercase();
                    lower.as_str()
                } else {
                    name
                };
                self.exact.get(name).copied().or_else(|| {
                    let (_, parent) = name.split_once('.')?;
                    self.wildcard.get(parent).copied()
                })
            })
            .or(self.default)?;
        self.certs.get(index)
    }

    /// Every certificate, in the order added.
    pub fn certificates(&self) -> &[StoredCert] {
        &self.certs
    }

    /// The earliest `not_after` of the store (for expiry alarms).
    pub fn earliest_expiry(&self) -> Option<i64> {
        self.certs.iter().map(|c| c.summary.not_after).min()
    }
}

/// `example.test`-like: labels of `A-Za-z0-9-_`, no empty label. Used for SNI patterns.
fn is_dns_pattern_part(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = self.select(hello.server_name());
        if chosen.is_none() {
            tracing::debug!(sni = ?hello.server_name(), "no certificate for this name and no default");
        }
        chosen.map(|c| c.certified.clone())
    }
}

/// Session resumption state shared by every shard: ticket keys (ring `Ticketer`, rotated every
/// 6 hours, the previous key still accepted) and a session-ID cache for TLS 1.2 clients without
/// tickets. Build it once per process and hand the same value to every [`server_config`] call,
/// on every shard and every reload: a ticket issued by one core is then accepted by all.
#[derive(Debug, Clone)]
pub struct Resumption {
    pub ticketer: Arc<dyn ProducesTickets>,
    pub cache: Arc<dyn StoresServerSessions + Send + Sync>,
}

impl Resumption {
    /// `cache_entries`: sessions kept for session-ID resumption (e.g. 64k).
    pub fn new(cache_entries: usize) -> Result<Resumption, rustls::Error> {
        Ok(Resumption {
            ticketer: ring_provider::Ticketer::new()?,
            cache: rustls::server::ServerSessionMemoryCache::new(cache_entries),
        })
    }
}

/// Client authentication of a listener, with what it needs.
#[derive(Debug, Clone)]
pub enum ClientAuthConfig {
    None,
    Optional(Arc<TrustBundles>),
    Required(Arc<TrustBundles>),
}

/// The settings of one `tls` listener.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub min_version: MinVersion,
    /// Offered ALPN protocols, in server preference order; empty: no ALPN.
    pub alpn: Vec<Vec<u8>>,
    pub client_auth: ClientAuthConfig,
    /// Hears each client-certificate verification (counters by reason).
    pub observer: Option<Arc<dyn VerifyObserver>>,
}

/// Sessions cached per generation of a client-auth listener (TLS 1.2 session IDs).
const CLIENT_AUTH_SESSION_CACHE: usize = 16_384;

/// A listener's `ServerConfig`. Cheap to share: one `Arc` per listener per snapshot, used by
/// every connection of every shard. With client authentication, sessions resume only within the
/// generation (trust bundles and CRLs) they were verified in.
pub fn server_config(
    certs: Arc<CertStore>,
    settings: &ServerSettings,
    resumption: &Resumption,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(settings.min_version.versions())?;
    let builder = match &settings.client_auth {
        ClientAuthConfig::None => builder.with_no_client_auth(),
        ClientAuthConfig::Optional(bundles) | ClientAuthConfig::Required(bundles) => {
            if bundles.is_empty() {
                return Err(TlsSetupError::NoTrustBundles);
            }
            let mandatory = matches!(settings.client_auth, ClientAuthConfig::Required(_));
            builder.with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
                bundles.clone(),
                mandatory,
                &provider,
                settings.observer.clone(),
            )))
        }
    };
    let mut config = builder.with_cert_resolver(certs);
    config.alpn_protocols = settings.alpn.clone();
    if matches!(settings.client_auth, ClientAuthConfig::None) {
        config.ticketer = resumption.ticketer.clone();
        config.session_storage = resumption.cache.clone();
    } else {
        // A resumed session skips the client-certificate check, so a session must not outlive
        // the trust material it was verified against: with client auth, each generation gets
        // its own ticket keys and session cache, and a reload (a new CRL, a new bundle) makes
        // every client verify again.
        config.ticketer = ring_provider::Ticketer::new()?;
        config.session_storage =
            rustls::server::ServerSessionMemoryCache::new(CLIENT_AUTH_SESSION_CACHE);
    }
    Ok(Arc::new(config))
}

/// The settings of one cluster's upstream TLS.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub min_version: MinVersion,
    pub alpn: Vec<Vec<u8>>,
    /// The gateway's own identity for mTLS; `None`: no client certificate.
    pub identity: Option<Arc<CertifiedKey>>,
    /// Normally a [`super::spiffe::SpiffeServerVerifier`].
    pub verifier: Arc<dyn ServerCertVerifier>,
}

/// A cluster's `ClientConfig`. The SNI is given per connection (`ClientConnection::new(config,
/// server_name)`); [`server_name`] checks the configured one.
pub fn client_config(settings: &UpstreamSettings) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(settings.min_version.versions())?
        .dangerous()
        .with_custom_certificate_verifier(settings.verifier.clone());
    let mut config = match &settings.identity {
        Some(identity) => {
            builder.with_client_cert_resolver(Arc::new(FixedIdentity(identity.clone())))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = settings.alpn.clone();
    Ok(Arc::new(config))
}

/// Presents the gateway's identity to every upstream that asks for a client certificate.
#[derive(Debug)]
struct FixedIdentity(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The SNI to send upstream: a DNS name, or an IP address (sent as no SNI by rustls).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsSetupError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsSetupError::BadPattern(name.to_owned()))
}
