//! Real rustls handshakes between a `ClientConnection` and a `ServerConnection` in memory (no
//! sockets), over certificates from testkit's PKI.

use std::sync::Arc;
use std::time::SystemTime;

use meshgate_testkit::pki::{BadCert, EXAMPLE, Leaf, OTHER, Pki};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    AlertDescription, ClientConfig, ClientConnection, HandshakeKind, RootCertStore,
    ServerConnection,
};

use super::certs::{
    CertStore, ClientAuthConfig, MinVersion, Resumption, ServerSettings, StoredCert,
    UpstreamSettings, certified_key, client_config, load_identity, provider, server_config,
};
use super::spiffe::{
    ExpectedPeer, Rejection, SpiffeId, SpiffeServerVerifier, TrustBundles, TrustDomain,
    VerifyCounts, VerifyObserver, peer_spiffe_id,
};

fn pki() -> Pki {
    Pki::new().unwrap_or_else(|err| panic!("{err:#}"))
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|err| panic!("{err}"))
}

fn stored(leaf: &Leaf, sni: &[&str]) -> StoredCert {
    let (certified, summary) = ok(certified_key(leaf.chain.clone(), &leaf.key()));
    StoredCert {
        certified,
        summary,
        sni: sni.iter().map(|s| (*s).to_owned()).collect(),
        source: format!("mem:{}", sni.first().unwrap_or(&"default")).into(),
    }
}

fn bundles(domains: &[(&str, CertificateDer<'static>)]) -> Arc<TrustBundles> {
    let mut bundles = TrustBundles::new();
    for (name, root) in domains {
        ok(bundles.add(ok(TrustDomain::new(name)), std::slice::from_ref(root), &[]));
    }
    Arc::new(bundles)
}

/// How a handshake ended.
#[derive(Debug)]
struct Outcome {
    client: Option<rustls::Error>,
    server: Option<rustls::Error>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.client.is_none() && self.server.is_none()
    }

    fn alert_received_by_client(&self) -> Option<AlertDescription> {
        match &self.client {
            Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
            _ => None,
        }
    }
}

/// Shuttles records both ways until neither side has anything to say; then exchanges one
/// byte of application data so TLS 1.3 client-certificate failures surface.
fn drive(client: &mut ClientConnection, server: &mut ServerConnection) -> Outcome {
    let mut outcome = Outcome {
        client: None,
        server: None,
    };
    let mut app_data_sent = false;
    for _ in 0..64 {
        let mut progressed = false;
        let mut buf = Vec::new();
        while client.wants_write() {
            if client.write_tls(&mut buf).unwrap_or(0) == 0 {
                break;
            }
        }
        if !buf.is_empty() && outcome.server.is_none() {
            progressed = true;
            let mut rd = &buf[..];
            while !rd.is_empty() {
                if server.read_tls(&mut rd).unwrap_or(0) == 0 {
                    break;
                }
                if let Err(err) = server.process_new_packets() {
                    outcome.server = Some(err);
                    break;
                }
            }
        }
        let mut buf = Vec::new();
        while server.wants_write() {
            if server.write_tls(&mut buf).unwrap_or(0) == 0 {
                break;
            }
        }
        if !buf.is_empty() && outcome.client.is_none() {
            progressed = true;
            let mut rd = &buf[..];
            while !rd.is_empty() {
                if client.read_tls(&mut rd).unwrap_or(0) == 0 {
                    break;
                }
                if let Err(err) = client.process_new_packets() {
                    outcome.client = Some(err);
                    break;
                }
            }
        }
        if !progressed {
            if !app_data_sent
                && !client.is_handshaking()
                && outcome.client.is_none()
                && outcome.server.is_none()
            {
                use std::io::Write;
                app_data_sent = true;
                let _ = client.writer().write_all(b"x");
                continue;
            }
            break;
        }
    }
    outcome
}

/// A downstream client trusting `root` for the server, presenting `identity` if given.
fn downstream_client(
    root: &CertificateDer<'static>,
    identity: Option<&Leaf>,
    versions: &'static [&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    ok(roots.add(root.clone()));
    let builder =
        ok(ClientConfig::builder_with_provider(provider()).with_protocol_versions(versions))
            .with_root_certificates(roots);
    let config = match identity {
        Some(leaf) => ok(builder.with_client_auth_cert(leaf.chain.clone(), leaf.key())),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

const TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

struct Gateway {
    config: Arc<rustls::ServerConfig>,
    counts: Arc<VerifyCounts>,
}

fn gateway(pki: &Pki, auth: &str, trust: &[(&str, CertificateDer<'static>)]) -> Gateway {
    let server = ok(pki.example.server(&["gateway.example.test"]));
    let mut store = CertStore::new();
    ok(store.add(stored(&server, &[])));
    let counts = Arc::new(VerifyCounts::default());
    let bundles = bundles(trust);
    let client_auth = match auth {
        "required" => ClientAuthConfig::Required(bundles),
        "optional" => ClientAuthConfig::Optional(bundles),
        _ => ClientAuthConfig::None,
    };
    let settings = ServerSettings {
        min_version: MinVersion::Tls12,
        alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        client_auth,
        observer: Some(counts.clone() as Arc<dyn VerifyObserver>),
    };
    let config = ok(server_config(
        Arc::new(store),
        &settings,
        &ok(Resumption::new(256)),
    ));
    Gateway { config, counts }
}

fn connect(
    client: &Arc<ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
    sni: &str,
) -> (ClientConnection, ServerConnection, Outcome) {
    let name = ok(ServerName::try_from(sni.to_owned()));
    let mut c = ok(ClientConnection::new(client.clone(), name));
    let mut s = ok(ServerConnection::new(server.clone()));
    let outcome = drive(&mut c, &mut s);
    (c, s, outcome)
}

#[test]
fn valid_svid_is_accepted_and_routable_on_both_versions() {
    let pki = pki();
    let gw = gateway(&pki, "required", &[(EXAMPLE, pki.example.root_der())]);
    let client_leaf = ok(pki.example.svid("/client"));
    for (versions, want) in [
        (TLS12, rustls::ProtocolVersion::TLSv1_2),
        (TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let client = downstream_client(&pki.example.root_der(), Some(&client_leaf), versions);
        let (c, s, outcome) = connect(&client, &gw.config, "gateway.example.test");
        assert!(outcome.ok(), "{want:?}: {outcome:?}");
        assert_eq!(c.protocol_version(), Some(want));
        let id = peer_spiffe_id(&s).unwrap_or_else(|| panic!("no peer id"));
        assert_eq!(id.as_str(), "spiffe://example.test/client");
        assert_eq!(id.trust_domain_name(), EXAMPLE);
    }
    assert_eq!(gw.counts.accepted_total(), 2);
}

#[test]
fn every_bad_client_certificate_is_rejected_with_its_reason_and_alert() {
    let pki = pki();
    let both = [
        (EXAMPLE, pki.example.root_der()),
        (OTHER, pki.other.root_der()),
    ];
    let example_only = [(EXAMPLE, pki.example.root_der())];
    for bad in BadCert::ALL {
        let (want, trust): (Rejection, &[(&str, CertificateDer<'static>)]) = match bad {
            BadCert::Expired => (Rejection::Expired, &both),
            BadCert::NotYetValid => (Rejection::NotYetValid, &both),
            BadCert::WrongTrustDomain => (Rejection::UnknownTrustDomain, &example_only),
            // Valid in other.test, which is configured: still refused, because the
            // ID says example.test and only example.test's roots are consulted.
            BadCert::ForeignIssuer => (Rejection::UnknownIssuer, &both),
            BadCert::TwoUriSans => (Rejection::MultipleUriSans, &both),
            BadCert::NoUriSan => (Rejection::NotSpiffe, &both),
            BadCert::CaAsLeaf => (Rejection::CaAsLeaf, &both),
            BadCert::WrongKeyUsage => (Rejection::BadKeyUsage, &both),
            BadCert::SelfSigned => (Rejection::UnknownIssuer, &both),
        };
        for auth in ["required", "optional"] {
            let gw = gateway(&pki, auth, trust);
            let leaf = ok(pki.bad_client(bad));
            let client = downstream_client(&pki.example.root_der(), Some(&leaf), TLS13);
            let (_, s, outcome) = connect(&client, &gw.config, "gateway.example.test");
            let server_err = outcome
                .server
                .as_ref()
                .unwrap_or_else(|| panic!("{bad:?} ({auth}) accepted: {outcome:?}"));
            let got = Rejection::from_error(server_err);
            let exact_back = match want {
                Rejection::UnknownTrustDomain => Rejection::UnknownIssuer,
                other => other,
            };
            assert_eq!(got, Some(exact_back), "{bad:?} ({auth}): {server_err}");
            assert_eq!(
                outcome.alert_received_by_client(),
                Some(want.alert()),
                "{bad:?} ({auth}): {outcome:?}"
            );
            assert_eq!(gw.counts.rejected_total(want), 1, "{bad:?} counted");
            assert_eq!(gw.counts.accepted_total(), 0);
            assert!(peer_spiffe_id(&s).is_none());
        }
    }
}

#[test]
fn missing_certificate_required_vs_optional() {
    let pki = pki();
    let trust = [(EXAMPLE, pki.example.root_der())];
    let client = downstream_client(&pki.example.root_der(), None, TLS13);

    let gw = gateway(&pki, "required", &trust);
    let (_, _, outcome) = connect(&client, &gw.config, "gateway.example.test");
    let err = outcome
        .server
        .as_ref()
        .unwrap_or_else(|| panic!("accepted"));
    assert_eq!(Rejection::from_error(err), Some(Rejection::NoCertificate));
    assert_eq!(
        outcome.alert_received_by_client(),
        Some(Rejection::NoCertificate.alert())
    );

    let gw = gateway(&pki, "optional", &trust);
    let (_, s, outcome) = connect(&client, &gw.config, "gateway.example.test");
    assert!(outcome.ok(), "{outcome:?}");
    assert_eq!(peer_spiffe_id(&s), None);

    let gw = gateway(&pki, "none", &trust);
    let with_cert = downstream_client(
        &pki.example.root_der(),
        Some(&ok(pki.example.svid("/client"))),
        TLS13,
    );
    let (_, s, outcome) = connect(&with_cert, &gw.config, "gateway.example.test");
    assert!(outcome.ok(), "{outcome:?}");
    assert_eq!(peer_spiffe_id(&s), None, "none: no certificate requested");
}

#[test]
fn revoked_client_certificate_is_refused_by_the_domain_crl() {
    let pki = pki();
    let revoked = ok(pki.example.svid("/revoked"));
    let good = ok(pki.example.svid("/good"));
    let crl = ok(pki.example.crl(&[&revoked]));
    let mut bundles = TrustBundles::new();
    ok(bundles.add(
        ok(TrustDomain::new(EXAMPLE)),
        &[pki.example.root_der()],
        &[crl],
    ));
    let bundles = Arc::new(bundles);
    let verifier = super::spiffe::SpiffeClientVerifier::new(bundles, true, &provider(), None);
    let now = rustls::pki_types::UnixTime::now();
    assert_eq!(
        verifier.check(revoked.cert(), &revoked.chain[1..], now),
        Err(Rejection::Revoked)
    );
    assert_eq!(
        verifier
            .check(good.cert(), &good.chain[1..], now)
            .map(|id| id.to_string()),
        Ok("spiffe://example.test/good".to_owned())
    );
    // A leaf of another issuer than the CRL's: its status is unknown, so it is refused.
    let direct = ok(pki.other.svid("/x"));
    let mut bundles = TrustBundles::new();
    ok(bundles.add(
        ok(TrustDomain::new(OTHER)),
        &[pki.other.root_der()],
        &[ok(pki.example.crl(&[]))],
    ));
    let verifier =
        super::spiffe::SpiffeClientVerifier::new(Arc::new(bundles), true, &provider(), None);
    assert_eq!(
        verifier.check(direct.cert(), &[], now),
        Err(Rejection::RevocationUnknown)
    );
}

/// A resumed session skips the client-certificate check: with client auth, a new generation
/// (here: a CRL revoking the client) must not resume sessions of the previous one.
#[test]
fn client_auth_sessions_do_not_resume_across_generations() {
    let pki = pki();
    let server = ok(pki.example.server(&["gateway.example.test"]));
    let client_leaf = ok(pki.example.svid("/client"));
    let shared = ok(Resumption::new(256));
    let generation = |crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>| {
        let mut bundles = TrustBundles::new();
        ok(bundles.add(
            ok(TrustDomain::new(EXAMPLE)),
            &[pki.example.root_der()],
            &crls,
        ));
        let settings = ServerSettings {
            min_version: MinVersion::Tls12,
            alpn: Vec::new(),
            client_auth: ClientAuthConfig::Required(Arc::new(bundles)),
            observer: None,
        };
        let mut store = CertStore::new();
        ok(store.add(stored(&server, &[])));
        ok(server_config(Arc::new(store), &settings, &shared))
    };
    let before = generation(Vec::new());
    let after = generation(vec![ok(pki.example.crl(&[&client_leaf]))]);
    for version in [TLS13, TLS12] {
        let client = downstream_client(&pki.example.root_der(), Some(&client_leaf), version);
        let (c, s, outcome) = connect(&client, &before, "gateway.example.test");
        assert!(outcome.ok(), "{outcome:?}");
        assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
        drop(c);
        let (_, s, outcome) = connect(&client, &before, "gateway.example.test");
        assert!(outcome.ok(), "{outcome:?}");
        assert_eq!(
            s.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{version:?}: resumes within its generation"
        );
        let (_, _, outcome) = connect(&client, &after, "gateway.example.test");
        assert!(
            !outcome.ok(),
            "{version:?}: the revoked client must not resume into the new generation: {outcome:?}"
        );
    }
}

#[test]
fn certificates_are_chosen_by_sni() {
    let pki = pki();
    let exact = ok(pki.example.server(&["api.example.test"]));
    let wild = ok(pki.example.server(&["*.apps.example.test"]));
    let fallback = ok(pki.example.server(&["gateway.example.test"]));
    let mut store = CertStore::new();
    ok(store.add(stored(&exact, &["api.example.test"])));
    ok(store.add(stored(&wild, &["*.apps.example.test"])));
    ok(store.add(stored(&fallback, &[])));
    let cases = [
        (Some("api.example.test"), &exact),
        (Some("API.Example.Test."), &exact),
        (Some("web.apps.example.test"), &wild),
        // One label deep only: falls back to the default.
        (Some("a.b.apps.example.test"), &fallback),
        (Some("apps.example.test"), &fallback),
        (Some("gateway.example.test"), &fallback),
        (None, &fallback),
    ];
    for (sni, want) in cases {
        let chosen = store.select(sni).map(|c| &c.certified.cert[0]);
        assert_eq!(chosen, Some(want.cert()), "{sni:?}");
    }
    let settings = ServerSettings {
        min_version: MinVersion::Tls12,
        alpn: Vec::new(),
        client_auth: ClientAuthConfig::None,
        observer: None,
    };
    let config = ok(server_config(
        Arc::new(store),
        &settings,
        &ok(Resumption::new(16)),
    ));
    // Through rustls: the client sees the certificate for the name it asked for.
    let client = downstream_client(&pki.example.root_der(), None, TLS12);
    for (sni, want) in [
        ("api.example.test", &exact),
        ("web.apps.example.test", &wild),
        ("gateway.example.test", &fallback),
    ] {
        let (c, _, outcome) = connect(&client, &config, sni);
        assert!(outcome.ok(), "{sni}: {outcome:?}");
        let presented = c.peer_certificates().and_then(|chain| chain.first());
        assert_eq!(presented, Some(want.cert()), "{sni}");
    }

    // The first certificate with names is the default when none is unnamed.
    let mut store = CertStore::new();
    ok(store.add(stored(&exact, &["api.example.test"])));
    ok(store.add(stored(&wild, &["*.apps.example.test"])));
    assert_eq!(
        store
            .select(Some("unknown.example.test"))
            .map(|c| &c.certified.cert[0]),
        Some(exact.cert())
    );
    // An empty store has nothing to offer: rustls then refuses the handshake.
    assert!(CertStore::new().select(Some("api.example.test")).is_none());
    let config = ok(server_config(
        Arc::new(CertStore::new()),
        &settings,
        &ok(Resumption::new(16)),
    ));
    let (_, _, outcome) = connect(&client, &config, "api.example.test");
    assert!(outcome.server.is_some() && !outcome.ok(), "{outcome:?}");
}

#[test]
fn store_refuses_duplicates_and_bad_patterns() {
    let pki = pki();
    let a = ok(pki.example.server(&["a.example.test"]));
    let mut store = CertStore::new();
    ok(store.add(stored(&a, &["a.example.test"])));
    assert!(store.add(stored(&a, &["A.example.test"])).is_err());
    assert!(store.add(stored(&a, &["*.*.example.test"])).is_err());
    assert!(store.add(stored(&a, &["bad name"])).is_err());
    ok(store.add(stored(&a, &[])));
    let err = store.add(stored(&a, &[])).err();
    assert!(
        matches!(err, Some(super::certs::TlsSetupError::TwoDefaults { .. })),
        "{err:?}"
    );
}

#[test]
fn pem_identities_are_checked_on_load() {
    let pki = pki();
    let dir = ok(tempfile_dir());
    let good = ok(pki.example.server(&["gateway.example.test"]));
    let other = ok(pki.example.server(&["other.example.test"]));
    let (cert, key) = ok(good.write_pem(dir.path(), "server"));
    let (_, other_key) = ok(other.write_pem(dir.path(), "other"));
    let (_, summary) = ok(load_identity(&cert, &key, SystemTime::now()));
    assert_eq!(summary.dns_names, ["gateway.example.test"]);
    let err = load_identity(&cert, &other_key, SystemTime::now())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("does not match the private key"), "{err}");
    let later = SystemTime::now() + std::time::Duration::from_secs(3 * 86_400);
    let err = load_identity(&cert, &key, later)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("expired on"), "{err}");
    assert!(err.contains("server.pem"), "{err}");
}

pub(super) fn tempfile_dir() -> std::io::Result<TempDir> {
    let path = std::env::temp_dir().join(format!(
        "meshgate-tls-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    std::fs::create_dir_all(&path)?;
    Ok(TempDir(path))
}

pub(super) struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn sessions_resume_across_shards_sharing_one_resumption() {
    let pki = pki();
    let server = ok(pki.example.server(&["gateway.example.test"]));
    let shared = ok(Resumption::new(256));
    let settings = ServerSettings {
        min_version: MinVersion::Tls12,
        alpn: Vec::new(),
        client_auth: ClientAuthConfig::None,
        observer: None,
    };
    let shard = |resumption: &Resumption| {
        let mut store = CertStore::new();
        ok(store.add(stored(&server, &[])));
        ok(server_config(Arc::new(store), &settings, resumption))
    };
    let (shard0, shard1) = (shard(&shared), shard(&shared));
    let elsewhere = shard(&ok(Resumption::new(256)));
    for version in [TLS13, TLS12] {
        let client = downstream_client(&pki.example.root_der(), None, version);
        let (c, s, outcome) = connect(&client, &shard0, "gateway.example.test");
        assert!(outcome.ok(), "{outcome:?}");
        assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
        drop(c);
        let (_, s, outcome) = connect(&client, &shard1, "gateway.example.test");
        assert!(outcome.ok(), "{outcome:?}");
        assert_eq!(
            s.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{version:?}: a ticket from shard 0 resumes on shard 1"
        );
        let (_, s, outcome) = connect(&client, &elsewhere, "gateway.example.test");
        assert!(outcome.ok(), "{outcome:?}");
        assert_eq!(
            s.handshake_kind(),
            Some(HandshakeKind::Full),
            "{version:?}: other ticket keys cannot resume"
        );
    }
}

/// An upstream served by `server_leaf`, requiring a client SVID of example.test.
fn upstream(pki: &Pki, server_leaf: &Leaf) -> (Arc<rustls::ServerConfig>, Arc<VerifyCounts>) {
    let mut store = CertStore::new();
    ok(store.add(stored(server_leaf, &[])));
    let counts = Arc::new(VerifyCounts::default());
    let settings = ServerSettings {
        min_version: MinVersion::Tls13,
        alpn: vec![b"h2".to_vec()],
        client_auth: ClientAuthConfig::Required(bundles(&[(EXAMPLE, pki.example.root_der())])),
        observer: Some(counts.clone() as Arc<dyn VerifyObserver>),
    };
    (
        ok(server_config(
            Arc::new(store),
            &settings,
            &ok(Resumption::new(16)),
        )),
        counts,
    )
}

fn origination(
    pki: &Pki,
    expected: ExpectedPeer,
    identity: Option<&Leaf>,
) -> (Arc<ClientConfig>, Arc<VerifyCounts>) {
    let counts = Arc::new(VerifyCounts::default());
    let verifier = SpiffeServerVerifier::new(
        expected,
        bundles(&[
            (EXAMPLE, pki.example.root_der()),
            (OTHER, pki.other.root_der()),
        ]),
        &provider(),
        Some(counts.clone() as Arc<dyn VerifyObserver>),
    );
    let identity = identity.map(|leaf| ok(certified_key(leaf.chain.clone(), &leaf.key())).0);
    let settings = UpstreamSettings {
        min_version: MinVersion::Tls12,
        alpn: vec![b"h2".to_vec()],
        identity,
        verifier: Arc::new(verifier),
    };
    (ok(client_config(&settings)), counts)
}

#[test]
fn upstream_mtls_by_spiffe_id() {
    let pki = pki();
    let backend = ok(pki.example.svid("/backend"));
    let gateway_id = ok(pki.example.svid("/gateway"));
    let (server, server_counts) = upstream(&pki, &backend);
    let want = ok(SpiffeId::parse("spiffe://example.test/backend"));

    let (client, counts) = origination(
        &pki,
        ExpectedPeer::SpiffeIds(vec![want.clone()]),
        Some(&gateway_id),
    );
    let (c, s, outcome) = connect(&client, &server, "backend.example.test");
    assert!(outcome.ok(), "{outcome:?}");
    assert_eq!(c.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        peer_spiffe_id(&s).map(|id| id.to_string()).as_deref(),
        Some("spiffe://example.test/gateway")
    );
    assert_eq!(
        (counts.accepted_total(), server_counts.accepted_total()),
        (1, 1)
    );

    let (client, _) = origination(
        &pki,
        ExpectedPeer::TrustDomains(vec![ok(TrustDomain::new(EXAMPLE))]),
        Some(&gateway_id),
    );
    assert!(connect(&client, &server, "backend.example.test").2.ok());

    // A valid SVID, but not the one expected.
    let (client, counts) = origination(
        &pki,
        ExpectedPeer::SpiffeIds(vec![ok(SpiffeId::parse("spiffe://example.test/db"))]),
        Some(&gateway_id),
    );
    let (_, _, outcome) = connect(&client, &server, "backend.example.test");
    let err = outcome
        .client
        .as_ref()
        .unwrap_or_else(|| panic!("accepted"));
    assert_eq!(
        Rejection::from_error(err),
        Some(Rejection::UnexpectedIdentity)
    );
    assert_eq!(counts.rejected_total(Rejection::UnexpectedIdentity), 1);
    let (client, _) = origination(
        &pki,
        ExpectedPeer::TrustDomains(vec![ok(TrustDomain::new(OTHER))]),
        Some(&gateway_id),
    );
    assert!(!connect(&client, &server, "backend.example.test").2.ok());

    // Without our identity the upstream refuses us.
    let (client, _) = origination(&pki, ExpectedPeer::SpiffeIds(vec![want]), None);
    let (_, _, outcome) = connect(&client, &server, "backend.example.test");
    assert_eq!(
        outcome.server.as_ref().and_then(Rejection::from_error),
        Some(Rejection::NoCertificate)
    );
}

#[test]
fn upstream_tls_by_dns_name() {
    let pki = pki();
    let backend = ok(pki.example.server(&["backend.example.test"]));
    let gateway_id = ok(pki.example.svid("/gateway"));
    let (server, _) = upstream(&pki, &backend);
    let (client, _) = origination(
        &pki,
        ExpectedPeer::DnsNames(vec!["backend.example.test".to_owned()]),
        Some(&gateway_id),
    );
    assert!(connect(&client, &server, "backend.example.test").2.ok());
    let (client, _) = origination(
        &pki,
        ExpectedPeer::DnsNames(vec!["db.example.test".to_owned()]),
        Some(&gateway_id),
    );
    let (_, _, outcome) = connect(&client, &server, "backend.example.test");
    assert_eq!(
        outcome.client.as_ref().and_then(Rejection::from_error),
        Some(Rejection::UnexpectedIdentity)
    );
    // A DNS-named certificate where a SPIFFE ID is expected.
    let (client, _) = origination(
        &pki,
        ExpectedPeer::TrustDomains(vec![ok(TrustDomain::new(EXAMPLE))]),
        Some(&gateway_id),
    );
    let (_, _, outcome) = connect(&client, &server, "backend.example.test");
    assert_eq!(
        outcome.client.as_ref().and_then(Rejection::from_error),
        Some(Rejection::NotSpiffe)
    );
}

#[test]
fn mozilla_intermediate_suites_only_and_ring() {
    let provider = provider();
    let names: Vec<String> = provider
        .cipher_suites
        .iter()
        .map(|s| format!("{:?}", s.suite()))
        .collect();
    assert_eq!(names.len(), 9, "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| n.contains("GCM") || n.contains("CHACHA20"))
    );
    assert!(names.iter().filter(|n| n.starts_with("TLS13_")).count() == 3);
}

// ---- the stage over a transport: peek, accept/connect, TlsStream, secure ----

mod over_a_transport {
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::future::Future;
    use std::io;
    use std::pin::{Pin, pin};
    use std::rc::Rc;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};
    use std::time::SystemTime;

    use futures_io::{AsyncRead, AsyncWrite};
    use meshgate_config::{ClientAuth, ClusterTls, ListenerTls, ServerCertificate, TlsVersion};
    use meshgate_testkit::pki::{BadCert, EXAMPLE, OTHER};

    use super::super::clienthello::Invalid;
    use super::super::setup::{ClusterTlsState, ListenerTlsState, select_route};
    use super::super::spiffe::{Rejection, TrustDomain, VerifyCounts};
    use super::super::stream::{self, PeekError};
    use super::super::{SecureError, secure};
    use super::{TempDir, ok, pki, tempfile_dir};
    use crate::tls::certs::Resumption;

    /// One direction of an in-memory connection.
    #[derive(Debug, Default)]
    struct Half {
        bytes: VecDeque<u8>,
        closed: bool,
    }

    /// One end of an in-memory duplex connection; reads of an empty, open half are `Pending`
    /// (the test executor polls again), writes deliver at most `chunk` bytes at a time.
    #[derive(Debug)]
    struct End {
        rx: Rc<RefCell<Half>>,
        tx: Rc<RefCell<Half>>,
        chunk: usize,
        /// Everything written through this end, for passthrough checks.
        log: Rc<RefCell<Vec<u8>>>,
    }

    fn duplex(chunk: usize) -> (End, End) {
        let (a, b) = (Rc::default(), Rc::default());
        (
            End {
                rx: Rc::clone(&a),
                tx: Rc::clone(&b),
                chunk,
                log: Rc::default(),
            },
            End {
                rx: b,
                tx: a,
                chunk,
                log: Rc::default(),
            },
        )
    }

    impl AsyncRead for End {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let mut half = self.rx.borrow_mut();
            if half.bytes.is_empty() {
                return if half.closed {
                    Poll::Ready(Ok(0))
                } else {
                    Poll::Pending
                };
            }
            let n = buf.len().min(half.bytes.len());
            for (slot, byte) in buf.iter_mut().zip(half.bytes.drain(..n)) {
                *slot = byte;
            }
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for End {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.chunk);
            self.tx.borrow_mut().bytes.extend(&buf[..n]);
            self.log.borrow_mut().extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.tx.borrow_mut().closed = true;
            Poll::Ready(Ok(()))
        }
    }

    /// Polls two futures in turn until both are done (they talk over a [`duplex`]).
    fn join<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
        let mut a = pin!(a);
        let mut b = pin!(b);
        let mut cx = Context::from_waker(Waker::noop());
        let (mut ra, mut rb) = (None, None);
        for _ in 0..100_000 {
            if ra.is_none()
                && let Poll::Ready(out) = a.as_mut().poll(&mut cx)
            {
                ra = Some(out);
            }
            if rb.is_none()
                && let Poll::Ready(out) = b.as_mut().poll(&mut cx)
            {
                rb = Some(out);
            }
            if let (Some(_), Some(_)) = (&ra, &rb) {
                break;
            }
        }
        match (ra, rb) {
            (Some(a), Some(b)) => (a, b),
            (a, b) => panic!("stuck: a done {}, b done {}", a.is_some(), b.is_some()),
        }
    }

    async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = std::future::poll_fn(|cx| Pin::new(&mut *w).poll_write(cx, buf)).await?;
            buf = &buf[n..];
        }
        std::future::poll_fn(|cx| Pin::new(&mut *w).poll_flush(cx)).await
    }

    async fn read_some<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; 64 * 1024];
        let n = std::future::poll_fn(|cx| Pin::new(&mut *r).poll_read(cx, &mut buf)).await?;
        buf.truncate(n);
        Ok(buf)
    }

    async fn close<W: AsyncWrite + Unpin>(w: &mut W) -> io::Result<()> {
        std::future::poll_fn(|cx| Pin::new(&mut *w).poll_close(cx)).await
    }

    /// The client side of a connection to the gateway over `end`, as `cluster` originates it.
    async fn dial(
        end: End,
        cluster: &ClusterTlsState,
    ) -> Result<stream::ClientTlsStream<End>, String> {
        stream::connect(
            end,
            cluster.client_config.clone(),
            cluster.server_name.clone(),
        )
        .await
        .map_err(|e| e.to_string())
    }

    struct Files {
        dir: TempDir,
    }

    impl Files {
        fn new() -> Files {
            let pki = pki();
            let dir = ok(tempfile_dir());
            let path = dir.path();
            ok(ok(pki.example.server(&["gateway.example.test"])).write_pem(path, "server"));
            ok(ok(pki.example.svid("/client")).write_pem(path, "client"));
            ok(ok(pki.other.svid("/client")).write_pem(path, "wrong-client"));
            ok(ok(pki.bad_client(BadCert::ForeignIssuer)).write_pem(path, "foreign"));
            ok(pki.example.write_bundle(path, "example"));
            ok(pki.other.write_bundle(path, "other"));
            Files { dir }
        }

        fn p(&self, name: &str) -> std::path::PathBuf {
            self.dir.path().join(name)
        }

        fn listener(&self, auth: ClientAuth, domains: &[&str]) -> ListenerTls {
            ListenerTls {
                certificates: vec![ServerCertificate {
                    cert: self.p("server.pem"),
                    key: self.p("server-key.pem"),
                    sni: Vec::new(),
                    default: true,
                }],
                min_version: TlsVersion::Tls12,
                alpn: vec!["h2".to_owned(), "http/1.1".to_owned()],
                client_auth: auth,
                trust_bundles: domains
                    .iter()
                    .map(|d| meshgate_config::TrustBundle {
                        trust_domain: ok(TrustDomain::new(d)),
                        bundle: self.p(if *d == EXAMPLE {
                            "example.pem"
                        } else {
                            "other.pem"
                        }),
                        crl: None,
                        federated: false,
                    })
                    .collect(),
            }
        }

        /// A meshgate cluster originating mTLS to the listener, as `name`.
        fn cluster(&self, identity: &str) -> ClusterTlsState {
            let tls = ClusterTls {
                sni: Some("gateway.example.test".to_owned()),
                alpn: vec!["h2".to_owned()],
                min_version: TlsVersion::Tls12,
                verify: meshgate_config::UpstreamVerify::DnsNames(vec![
                    "gateway.example.test".to_owned(),
                ]),
                trust_bundle: self.p("example.pem"),
                identity: Some(meshgate_config::TlsIdentity {
                    cert: self.p(&format!("{identity}.pem")),
                    key: self.p(&format!("{identity}-key.pem")),
                }),
            };
            ok(ClusterTlsState::build(
                &tls,
                [127, 0, 0, 1].into(),
                Arc::new(VerifyCounts::default()),
                SystemTime::now(),
            ))
        }
    }

    fn listener_state(files: &Files, auth: ClientAuth, domains: &[&str]) -> ListenerTlsState {
        ok(ListenerTlsState::build(
            &files.listener(auth, domains),
            &ok(Resumption::new(64)),
            Arc::new(VerifyCounts::default()),
            SystemTime::now(),
        ))
    }

    #[test]
    fn secure_then_echo_through_tls_streams() {
        let files = Files::new();
        let gateway = listener_state(&files, ClientAuth::Required, &[EXAMPLE, OTHER]);
        let upstream = files.cluster("client");
        // 7-byte writes: the ClientHello arrives in pieces and must be reassembled.
        let (client_end, server_end) = duplex(7);
        let server = async {
            let mut secured = secure(server_end, &gateway)
                .await
                .map_err(|e| e.to_string())?;
            let stats = crate::metrics::TlsHandshakeStats::default();
            secured.count(&stats, &gateway);
            let got = read_some(&mut secured.stream)
                .await
                .map_err(|e| e.to_string())?;
            write_all(&mut secured.stream, &got)
                .await
                .map_err(|e| e.to_string())?;
            let eof = read_some(&mut secured.stream)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((secured.sni, secured.alpn, secured.peer, got, eof, stats))
        };
        let client = async {
            let mut tls = dial(client_end, &upstream).await?;
            write_all(&mut tls, b"ping")
                .await
                .map_err(|e| e.to_string())?;
            let echo = read_some(&mut tls).await.map_err(|e| e.to_string())?;
            close(&mut tls).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(echo)
        };
        let (server, client) = join(server, client);
        let (sni, alpn, peer, got, eof, stats) = ok(server);
        assert_eq!(stats.completed_total(false), 1);
        let text = format!("{stats:?}");
        assert!(text.contains("example.test"), "{text}");
        assert_eq!(ok(client), b"ping");
        assert_eq!(got, b"ping");
        assert!(eof.is_empty(), "close_notify reads as end of stream");
        assert_eq!(sni.as_deref(), Some("gateway.example.test"));
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(
            peer.map(|p| p.to_string()).as_deref(),
            Some("spiffe://example.test/client")
        );
        assert_eq!(gateway.counts.accepted_total(), 1);
        assert_eq!(
            upstream
                .counts
                .rejected_total(Rejection::UnexpectedIdentity),
            0
        );
    }

    /// A TLS 1.3 server's session tickets wait for its first write (one send instead of two
    /// on a request/response connection); a read that has to wait does not send them; the
    /// client still gets them with the response and resumes with one.
    #[test]
    fn tls13_tickets_ride_with_the_first_write_and_still_resume() {
        let files = Files::new();
        let gateway = listener_state(&files, ClientAuth::None, &[]);
        let upstream = files.cluster("client");
        let session = |pause: usize| {
            let (client_end, server_end) = duplex(1 << 20);
            let sent = Rc::clone(&server_end.log);
            let server = async {
                let mut secured = secure(server_end, &gateway)
                    .await
                    .map_err(|e| e.to_string())?;
                let after_handshake = sent.borrow().len();
                // The client is still pausing: this read waits.
                let got = read_some(&mut secured.stream)
                    .await
                    .map_err(|e| e.to_string())?;
                let after_read = sent.borrow().len();
                write_all(&mut secured.stream, b"pong")
                    .await
                    .map_err(|e| e.to_string())?;
                let after_write = sent.borrow().len();
                Ok::<_, String>((
                    secured.resumed,
                    got,
                    [after_handshake, after_read, after_write],
                ))
            };
            let client = async {
                let mut tls = dial(client_end, &upstream).await?;
                let mut left = pause;
                std::future::poll_fn(|_| {
                    if left == 0 {
                        return Poll::Ready(());
                    }
                    left -= 1;
                    Poll::Pending
                })
                .await;
                write_all(&mut tls, b"ping")
                    .await
                    .map_err(|e| e.to_string())?;
                let reply = read_some(&mut tls).await.map_err(|e| e.to_string())?;
                let kind = tls.get_ref().1.handshake_kind();
                Ok::<_, String>((reply, kind))
            };
            let (server, client) = join(server, client);
            (ok(server), ok(client))
        };
        let ((resumed, got, [handshake, read, write]), (reply, kind)) = session(5);
        assert!(!resumed);
        assert_eq!(kind, Some(rustls::HandshakeKind::Full));
        assert_eq!(
            (got.as_slice(), reply.as_slice()),
            (&b"ping"[..], &b"pong"[..])
        );
        assert_eq!(
            read, handshake,
            "nothing sent while waiting for the request"
        );
        // Tickets (2 x ~250 bytes) + the 4-byte record (22 bytes): well over one record.
        assert!(
            write - read > 200,
            "tickets went out with the reply: {}",
            write - read
        );
        let ((resumed, _, _), (reply, kind)) = session(0);
        assert!(resumed, "the held tickets reached the client and resume");
        assert_eq!(kind, Some(rustls::HandshakeKind::Resumed));
        assert_eq!(reply, b"pong");
    }

    fn refused(files: &Files, gateway: &ListenerTlsState, identity: &str) -> SecureError {
        let upstream = files.cluster(identity);
        let (client_end, server_end) = duplex(1 << 16);
        let server = secure(server_end, gateway);
        let client = async {
            let mut tls = stream::connect(
                client_end,
                upstream.client_config.clone(),
                upstream.server_name.clone(),
            )
            .await
            .map_err(|e| e.to_string())?;
            // TLS 1.3: the refusal arrives after the client's Finished.
            write_all(&mut tls, b"x").await.map_err(|e| e.to_string())?;
            read_some(&mut tls)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        let (server, client) = join(server, client);
        assert!(client.is_err(), "client must see the refusal");
        match server {
            Ok(_) => panic!("{identity} accepted"),
            Err(err) => err,
        }
    }

    #[test]
    fn secure_refuses_bad_peers_with_reasons() {
        let files = Files::new();
        let gateway = listener_state(&files, ClientAuth::Required, &[EXAMPLE]);
        let err = refused(&files, &gateway, "wrong-client");
        assert_eq!(err.reason(), "unknown_issuer");
        assert!(crate::tls::FAILURE_REASONS.contains(&err.reason()));
        // Refused after ServerHello: the version is known and labelled.
        assert_eq!(crate::tls::version_label(err.version()), "TLSv1.3");
        let stats = crate::metrics::TlsHandshakeStats::default();
        err.count(&stats);
        assert_eq!(stats.failed_total(), 1);
        assert_eq!(
            gateway.counts.rejected_total(Rejection::UnknownTrustDomain),
            1
        );
        let both = listener_state(&files, ClientAuth::Required, &[EXAMPLE, OTHER]);
        let err = refused(&files, &both, "foreign");
        assert_eq!(err.rejection(), Some(Rejection::UnknownIssuer));
        assert_eq!(both.counts.rejected_total(Rejection::UnknownIssuer), 1);
    }

    #[test]
    fn plaintext_and_truncated_clients_are_refused_before_rustls() {
        let files = Files::new();
        let gateway = listener_state(&files, ClientAuth::None, &[]);
        let (client_end, server_end) = duplex(1 << 16);
        let client = async move {
            let mut end = client_end;
            write_all(&mut end, b"GET / HTTP/1.1\r\n\r\n").await
        };
        let (server, client) = join(secure(server_end, &gateway), client);
        ok(client);
        let err = server.err().unwrap_or_else(|| panic!("accepted plaintext"));
        assert!(
            matches!(
                err,
                SecureError::Peek(PeekError::Invalid(Invalid::NotTls { first_byte: b'G' }))
            ),
            "{err}"
        );
        assert_eq!(err.reason(), "not_tls");

        let (client_end, server_end) = duplex(1 << 16);
        let client = async move {
            let mut end = client_end;
            write_all(&mut end, &[22, 3, 1, 0, 200, 1, 0]).await?;
            close(&mut end).await
        };
        let (server, client) = join(secure(server_end, &gateway), client);
        ok(client);
        assert!(matches!(
            server.err(),
            Some(SecureError::Peek(PeekError::Eof(7)))
        ));
    }

    #[test]
    fn passthrough_peek_keeps_the_original_bytes() {
        let files = Files::new();
        let upstream = files.cluster("client");
        let (client_end, mut server_end) = duplex(3);
        let sent = Rc::clone(&client_end.log);
        let server = async {
            let mut buf = Vec::new();
            let hello = stream::peek_client_hello(&mut server_end, &mut buf).await;
            (hello, buf)
        };
        let client = async {
            // The handshake never completes (nobody answers); only the hello matters.
            let mut cx_budget = 0;
            let connect = stream::connect(
                client_end,
                upstream.client_config.clone(),
                upstream.server_name.clone(),
            );
            let mut connect = pin!(connect);
            std::future::poll_fn(|cx| {
                cx_budget += 1;
                match connect.as_mut().poll(cx) {
                    Poll::Pending if cx_budget < 50 => Poll::Pending,
                    _ => Poll::Ready(()),
                }
            })
            .await;
        };
        let ((hello, buf), ()) = join(server, client);
        let hello = hello.unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(hello.server_name.as_deref(), Some("gateway.example.test"));
        assert_eq!(hello.alpn().collect::<Vec<_>>(), [&b"h2"[..]]);
        let sent = sent.borrow();
        assert_eq!(
            &buf[..],
            &sent[..buf.len()],
            "peeked bytes are the client's bytes"
        );
        assert_eq!(hello.records_len, sent.len());
    }

    #[test]
    fn routes_are_selected_by_sni_then_peer_then_default() {
        let config = ok(meshgate_config::parse(
            r#"version = 1
[[listeners]]
name = "pt"
address = "127.0.0.1:0"
protocol = "tls-passthrough"
default_route = "fallback"
[[routes]]
name = "a"
listener = "pt"
cluster = "c"
match = { sni = ["a.example.test"] }
[[routes]]
name = "wild"
listener = "pt"
cluster = "c"
match = { sni = ["*.b.example.test"] }
[[routes]]
name = "fallback"
listener = "pt"
cluster = "c"
match = { sni = ["fallback.example.test"] }
[[clusters]]
name = "c"
endpoints = ["127.0.0.1:1"]
"#,
            "routes.toml",
        ));
        let listener = &config.listeners[0];
        let pick = |sni: Option<&str>| {
            select_route(
                &config.routes,
                &listener.routes,
                listener.default_route,
                sni,
                None,
            )
            .map(|i| config.routes[i].name.as_str())
        };
        assert_eq!(pick(Some("a.example.test")), Some("a"));
        assert_eq!(pick(Some("A.EXAMPLE.TEST.")), Some("a"));
        assert_eq!(pick(Some("x.b.example.test")), Some("wild"));
        assert_eq!(pick(Some("b.example.test")), Some("fallback"));
        assert_eq!(pick(Some("y.x.b.example.test")), Some("fallback"));
        assert_eq!(pick(None), Some("fallback"));
        assert!(super::super::setup::sni_known(
            &config.routes,
            &listener.routes,
            "a.example.test"
        ));
        let no_default = select_route(&config.routes, &listener.routes, None, Some("zzz"), None);
        assert_eq!(no_default, None, "no match and no default: close");
    }
}

// ---- interop: the example config and its make.sh certificates, with openssl and curl ----

mod interop {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::thread;
    use std::time::{Duration, SystemTime};

    use rustls::ServerConnection;

    use super::super::certs::Resumption;
    use super::super::setup::ListenerTlsState;
    use super::super::spiffe::{Rejection, VerifyCounts, peer_spiffe_id};
    use super::{TempDir, ok, tempfile_dir};

    /// `config/examples/mtls-gateway.toml` with fresh certificates from its make.sh, in a
    /// temporary directory.
    fn example() -> (TempDir, ListenerTlsState) {
        let dir = ok(tempfile_dir());
        let examples = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/examples"));
        let status = Command::new("sh")
            .arg(examples.join("certs/make.sh"))
            .arg(dir.path().join("certs"))
            .stdout(Stdio::null())
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "make.sh failed (is openssl installed?)"
        );
        let config_path = dir.path().join("mtls-gateway.toml");
        ok(std::fs::copy(
            examples.join("mtls-gateway.toml"),
            &config_path,
        ));
        let config = ok(meshgate_config::load(&config_path));
        let tls = config.listeners[0]
            .tls
            .as_ref()
            .unwrap_or_else(|| panic!("mtls-gateway has a tls listener"));
        let state = ok(ListenerTlsState::build(
            tls,
            &ok(Resumption::new(64)),
            Arc::new(VerifyCounts::default()),
            SystemTime::now(),
        ));
        (dir, state)
    }

    /// What the test server saw of one connection.
    type Seen = Result<Option<String>, String>;

    /// A blocking rustls server on 127.0.0.1 that answers each connection with an HTTP
    /// response naming the client's SPIFFE ID, and reports what it saw.
    fn serve(state: &ListenerTlsState, connections: usize) -> (u16, mpsc::Receiver<Seen>) {
        let listener = ok(TcpListener::bind("127.0.0.1:0"));
        let port = ok(listener.local_addr()).port();
        let config = state.server_config.clone();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for _ in 0..connections {
                let Ok((sock, _)) = listener.accept() else {
                    return;
                };
                let _ = tx.send(serve_one(sock, config.clone()));
            }
        });
        (port, rx)
    }

    fn serve_one(mut sock: TcpStream, config: Arc<rustls::ServerConfig>) -> Seen {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut conn = ServerConnection::new(config).map_err(|e| e.to_string())?;
        while conn.is_handshaking() {
            if let Err(err) = conn.complete_io(&mut sock) {
                let reason = err
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .and_then(Rejection::from_error);
                return Err(reason.map_or_else(|| err.to_string(), |r| r.as_str().to_owned()));
            }
        }
        let peer = peer_spiffe_id(&conn).map(|id| id.to_string());
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") && !request.ends_with(b"\n\n") {
            match tls.read(&mut byte) {
                Ok(1) => request.push(byte[0]),
                _ => break,
            }
        }
        let body = peer.clone().unwrap_or_default();
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tls.write_all(response.as_bytes());
        tls.conn.send_close_notify();
        let _ = tls.flush();
        Ok(peer)
    }

    fn certs(dir: &TempDir, name: &str) -> PathBuf {
        dir.path().join("certs").join(name)
    }

    fn curl(dir: &TempDir, port: u16, client: &str) -> std::process::Output {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(certs(dir, "ca.pem"))
            .arg("--cert")
            .arg(certs(dir, &format!("{client}.pem")))
            .arg("--key")
            .arg(certs(dir, &format!("{client}-key.pem")))
            .arg("--resolve")
            .arg(format!("gateway.example.test:{port}:127.0.0.1"))
            .arg(format!("https://gateway.example.test:{port}/"))
            .output();
        ok(output)
    }

    fn recv(rx: &mpsc::Receiver<Seen>) -> Seen {
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|err| panic!("server saw nothing: {err}"))
    }

    #[test]
    fn curl_completes_mtls_and_the_wrong_domain_is_refused() {
        let (dir, state) = example();
        let (port, rx) = serve(&state, 2);
        let good = curl(&dir, port, "client");
        assert!(
            good.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&good.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&good.stdout),
            "spiffe://example.test/client"
        );
        assert_eq!(
            recv(&rx),
            Ok(Some("spiffe://example.test/client".to_owned()))
        );
        let bad = curl(&dir, port, "wrong-client");
        assert!(!bad.status.success(), "wrong-client was accepted");
        assert_eq!(recv(&rx), Err("unknown_issuer".to_owned()));
        assert_eq!(
            state.counts.rejected_total(Rejection::UnknownTrustDomain),
            1
        );
        assert_eq!(state.counts.accepted_total(), 1);
    }

    #[test]
    fn openssl_s_client_completes_mtls_on_tls12_and_tls13() {
        let (dir, state) = example();
        let (port, rx) = serve(&state, 3);
        for (version, client) in [
            ("-tls1_3", "client"),
            ("-tls1_2", "client"),
            ("-tls1_3", "none"),
        ] {
            let mut cmd = Command::new("openssl");
            cmd.args(["s_client", "-connect"])
                .arg(format!("127.0.0.1:{port}"))
                .args(["-servername", "gateway.example.test", version, "-CAfile"])
                .arg(certs(&dir, "ca.pem"))
                .args(["-verify_return_error", "-ign_eof"]);
            if client != "none" {
                cmd.arg("-cert")
                    .arg(certs(&dir, &format!("{client}.pem")))
                    .arg("-key")
                    .arg(certs(&dir, &format!("{client}-key.pem")));
            }
            let mut child = ok(cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn());
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"GET / HTTP/1.0\r\n\r\n");
            }
            let output = ok(child.wait_with_output());
            let stdout = String::from_utf8_lossy(&output.stdout);
            let seen = recv(&rx);
            if client == "none" {
                assert_eq!(seen, Err("no_certificate".to_owned()), "{stdout}");
            } else {
                assert!(
                    stdout.contains("Verify return code: 0 (ok)"),
                    "{version}: {stdout}"
                );
                assert!(stdout.contains("spiffe://example.test/client"), "{stdout}");
                assert_eq!(
                    seen,
                    Ok(Some("spiffe://example.test/client".to_owned())),
                    "{version}"
                );
            }
        }
    }
}

/// Rotation: a reload builds new state from new files; new handshakes see the new certificate,
/// sessions from before the reload still resume (the ticket keys outlive the snapshot), an open
/// connection keeps its old config, and a bad new file fails the build (the caller keeps the
/// old state).
#[test]
fn rotation_keeps_sessions_and_refuses_bad_files() {
    use std::time::SystemTime;

    use super::setup::ListenerTlsState;
    use meshgate_config::{ClientAuth, ListenerTls, ServerCertificate, TlsVersion};

    let pki = pki();
    let dir = ok(tempfile_dir());
    let old = ok(pki.example.server(&["gateway.example.test"]));
    let new = ok(pki.example.server(&["gateway.example.test"]));
    ok(old.write_pem(dir.path(), "old"));
    ok(new.write_pem(dir.path(), "new"));
    let listener = |cert: &str, key: &str| ListenerTls {
        certificates: vec![ServerCertificate {
            cert: dir.path().join(format!("{cert}.pem")),
            key: dir.path().join(format!("{key}-key.pem")),
            sni: Vec::new(),
            default: true,
        }],
        min_version: TlsVersion::Tls12,
        alpn: Vec::new(),
        client_auth: ClientAuth::None,
        trust_bundles: Vec::new(),
    };
    let resumption = ok(Resumption::new(64));
    let counts = Arc::new(VerifyCounts::default());
    let build = |tls: &ListenerTls| {
        ListenerTlsState::build(tls, &resumption, counts.clone(), SystemTime::now())
    };
    let before = ok(build(&listener("old", "old")));
    let client = downstream_client(&pki.example.root_der(), None, TLS13);
    let (c, s, outcome) = connect(&client, &before.server_config, "gateway.example.test");
    assert!(outcome.ok(), "{outcome:?}");
    assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
    assert_eq!(
        c.peer_certificates().and_then(|p| p.first()),
        Some(old.cert())
    );

    let err = build(&listener("new", "old")).err().map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("does not match")),
        "{err:?}"
    );

    let after = ok(build(&listener("new", "new")));
    let (_, s, outcome) = connect(&client, &after.server_config, "gateway.example.test");
    assert!(outcome.ok(), "{outcome:?}");
    assert_eq!(
        s.handshake_kind(),
        Some(HandshakeKind::Resumed),
        "a session from before the reload resumes after it"
    );
    let fresh = downstream_client(&pki.example.root_der(), None, TLS13);
    let (c, _, outcome) = connect(&fresh, &after.server_config, "gateway.example.test");
    assert!(outcome.ok(), "{outcome:?}");
    assert_eq!(
        c.peer_certificates().and_then(|p| p.first()),
        Some(new.cert()),
        "new handshakes use the new certificate"
    );
    // The old snapshot still serves connections that hold it.
    let other = downstream_client(&pki.example.root_der(), None, TLS13);
    let (c, _, outcome) = connect(&other, &before.server_config, "gateway.example.test");
    assert!(outcome.ok(), "{outcome:?}");
    assert_eq!(
        c.peer_certificates().and_then(|p| p.first()),
        Some(old.cert())
    );
}
