//! From the validated config to rustls state: what a shard (or the control thread building a
//! snapshot) calls for each `tls` listener and each cluster with `[clusters.tls]`.
//!
//! Files are read again here (validation read them too): this is also the reload path, and a
//! file may have changed since. Errors carry the file and a hint; on reload the caller keeps
//! the old state when building the new one fails.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use meshgate_config::pem::{self, CertSummary};
use meshgate_config::{
    ClientAuth, ClusterTls, ListenerTls, Route, TlsVersion, UpstreamVerify, sni_matches,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};

use super::certs::{
    self, CertStore, ClientAuthConfig, MinVersion, Resumption, ServerSettings, TlsSetupError,
    UpstreamSettings,
};
use super::spiffe::{
    ExpectedPeer, SpiffeId, SpiffeServerVerifier, TrustBundles, TrustDomain, VerifyCounts,
    VerifyObserver,
};

fn min_version(version: TlsVersion) -> MinVersion {
    match version {
        TlsVersion::Tls12 => MinVersion::Tls12,
        TlsVersion::Tls13 => MinVersion::Tls13,
    }
}

fn alpn(list: &[String]) -> Vec<Vec<u8>> {
    list.iter().map(|p| p.as_bytes().to_vec()).collect()
}

/// Everything a `tls` listener needs, built once per config snapshot and shared by all shards.
#[derive(Debug, Clone)]
pub struct ListenerTlsState {
    pub server_config: Arc<ServerConfig>,
    /// For `GET /certs` and expiry gauges.
    pub certs: Arc<CertStore>,
    pub bundles: Arc<TrustBundles>,
    /// The roots of every trust bundle, for `GET /certs` and expiry gauges.
    pub bundle_roots: Vec<BundleRoot>,
    /// Client-certificate outcomes by reason (pass the same `Arc` across reloads to keep
    /// counting).
    pub counts: Arc<VerifyCounts>,
}

/// One root certificate of a loaded trust bundle, as `GET /certs` lists it.
#[derive(Debug, Clone)]
pub struct BundleRoot {
    /// The trust domain the bundle is configured for; `None`: web PKI roots (DNS names).
    pub trust_domain: Option<TrustDomain>,
    pub summary: CertSummary,
    /// The bundle file.
    pub source: PathBuf,
}

fn bundle_roots(
    domain: Option<&TrustDomain>,
    roots: &[rustls::pki_types::CertificateDer<'_>],
    source: &std::path::Path,
) -> Vec<BundleRoot> {
    roots
        .iter()
        .filter_map(pem::summarize)
        .map(|summary| BundleRoot {
            trust_domain: domain.cloned(),
            summary,
            source: source.to_owned(),
        })
        .collect()
}

impl ListenerTlsState {
    /// `resumption`: the process-wide ticket keys and session cache (see [`Resumption`]).
    pub fn build(
        tls: &ListenerTls,
        resumption: &Resumption,
        counts: Arc<VerifyCounts>,
        now: SystemTime,
    ) -> Result<ListenerTlsState, TlsSetupError> {
        let certs = Arc::new(CertStore::load(
            tls.certificates
                .iter()
                .map(|c| (c.cert.as_path(), c.key.as_path(), c.sni.as_slice())),
            now,
        )?);
        let mut bundles = TrustBundles::new();
        let mut summaries = Vec::new();
        for entry in &tls.trust_bundles {
            let roots = pem::read_bundle(&entry.bundle, now)?;
            summaries.extend(bundle_roots(
                Some(&entry.trust_domain),
                &roots,
                &entry.bundle,
            ));
            let crls = match &entry.crl {
                Some(path) => pem::read_crls(path)?,
                None => Vec::new(),
            };
            bundles
                .add(entry.trust_domain.clone(), &roots, &crls)
                .map_err(|err| {
                    TlsSetupError::File(pem::FileError {
                        path: entry.bundle.clone(),
                        problem: err.to_string(),
                        hint: "check the trust bundle and CRL files".to_owned(),
                    })
                })?;
        }
        let bundles = Arc::new(bundles);
        let client_auth = match tls.client_auth {
            ClientAuth::None => ClientAuthConfig::None,
            ClientAuth::Optional => ClientAuthConfig::Optional(bundles.clone()),
            ClientAuth::Required => ClientAuthConfig::Required(bundles.clone()),
        };
        let settings = ServerSettings {
            min_version: min_version(tls.min_version),
            alpn: alpn(&tls.alpn),
            client_auth,
            observer: Some(counts.clone() as Arc<dyn VerifyObserver>),
        };
        let server_config = certs::server_config(certs.clone(), &settings, resumption)?;
        Ok(ListenerTlsState {
            server_config,
            certs,
            bundles,
            bundle_roots: summaries,
            counts,
        })
    }
}

/// Everything a cluster with `[clusters.tls]` needs to originate TLS.
#[derive(Debug, Clone)]
pub struct ClusterTlsState {
    pub client_config: Arc<ClientConfig>,
    /// SNI to send (`ClientConnection::new(config, server_name)`); an IP sends no SNI.
    pub server_name: ServerName<'static>,
    pub counts: Arc<VerifyCounts>,
    /// The gateway's client certificate (`identity`), for `GET /certs` and expiry gauges.
    pub identity: Option<(CertSummary, PathBuf)>,
    /// The roots of `trust_bundle`.
    pub bundle_roots: Vec<BundleRoot>,
}

impl ClusterTlsState {
    /// `endpoint_ip`: used as the `ServerName` when no SNI is configured (rustls then sends
    /// no SNI).
    pub fn build(
        tls: &ClusterTls,
        endpoint_ip: std::net::IpAddr,
        counts: Arc<VerifyCounts>,
        now: SystemTime,
    ) -> Result<ClusterTlsState, TlsSetupError> {
        let roots = pem::read_bundle(&tls.trust_bundle, now)?;
        let (expected, domain) = match &tls.verify {
            UpstreamVerify::SpiffeIds(ids) => (
                ExpectedPeer::SpiffeIds(ids.clone()),
                ids.first().map(SpiffeId::trust_domain),
            ),
            UpstreamVerify::TrustDomains(domains) => (
                ExpectedPeer::TrustDomains(domains.clone()),
                domains.first().cloned(),
            ),
            UpstreamVerify::DnsNames(names) => (ExpectedPeer::DnsNames(names.clone()), None),
        };
        let summaries = bundle_roots(domain.as_ref(), &roots, &tls.trust_bundle);
        // Web PKI roots have no trust domain; they are filed under a name no SPIFFE ID can
        // reach from this verifier (DNS expectations never look a domain up).
        let domain = match domain {
            Some(domain) => domain,
            None => TrustDomain::new("dns-names.invalid").map_err(|_| TlsSetupError::Empty)?,
        };
        let mut bundles = TrustBundles::new();
        bundles.add(domain, &roots, &[]).map_err(|err| {
            TlsSetupError::File(pem::FileError {
                path: tls.trust_bundle.clone(),
                problem: err.to_string(),
                hint: "check the trust bundle file".to_owned(),
            })
        })?;
        let verifier = SpiffeServerVerifier::new(
            expected,
            Arc::new(bundles),
            &certs::provider(),
            Some(counts.clone() as Arc<dyn VerifyObserver>),
        );
        let (identity, identity_summary) = match &tls.identity {
            Some(identity) => {
                let (key, summary) = certs::load_identity(&identity.cert, &identity.key, now)?;
                (Some(key), Some((summary, identity.cert.clone())))
            }
            None => (None, None),
        };
        let settings = UpstreamSettings {
            min_version: min_version(tls.min_version),
            alpn: alpn(&tls.alpn),
            identity,
            verifier: Arc::new(verifier),
        };
        let server_name = match &tls.sni {
            Some(name) => certs::server_name(name)?,
            None => ServerName::IpAddress(endpoint_ip.into()),
        };
        Ok(ClusterTlsState {
            client_config: certs::client_config(&settings)?,
            server_name,
            counts,
            identity: identity_summary,
            bundle_roots: summaries,
        })
    }
}

/// `route::resolve` for `tls` and `tls-passthrough` listeners: the first of `candidates`
/// (a listener's `routes`, in order) whose match accepts `sni` and `peer`, else `default`.
/// `None`: close the connection.
pub fn select_route(
    routes: &[Route],
    candidates: &[usize],
    default: Option<usize>,
    sni: Option<&str>,
    peer: Option<&SpiffeId>,
) -> Option<usize> {
    candidates
        .iter()
        .copied()
        .find(|&index| {
            routes.get(index).is_some_and(|route| match &route.matcher {
                None => true,
                Some(matcher) => matcher.matches(sni, peer),
            })
        })
        .or(default)
}

/// Whether any route of a passthrough listener could take `sni` (for logging unknown names).
pub fn sni_known(routes: &[Route], candidates: &[usize], sni: &str) -> bool {
    candidates.iter().any(|&index| {
        routes
            .get(index)
            .and_then(|r| r.matcher.as_ref())
            .is_some_and(|m| sni_matches(&m.sni, sni))
    })
}
