//! Test PKI over several SPIFFE trust domains, generated with rcgen (ring, ECDSA P-256).
//!
//! [`Pki::new`] makes two trust domains: `example.test` (root -> intermediate -> leaves) and
//! `other.test` (root -> leaves). [`TrustDomainCa::svid`] issues a valid X509-SVID (one URI SAN,
//! cA=false, critical keyUsage digitalSignature, EKU serverAuth+clientAuth);
//! [`TrustDomainCa::server`] a DNS-named server certificate; [`Pki::bad_client`] one of the
//! [`BadCert`] matrix entries the verifiers must reject. [`Leaf::write_pem`] puts a leaf on disk
//! for config tests. Everything is made fresh per call: nothing is committed to the repository.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

/// The trust domain with a root and an intermediate.
pub const EXAMPLE: &str = "example.test";
/// The trust domain whose leaves the root signs directly.
pub const OTHER: &str = "other.test";

/// Serial numbers unique within the process (random-looking high bytes, counter low bytes).
fn next_serial() -> SerialNumber {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut bytes = vec![0x4d, 0x47];
    bytes.extend_from_slice(&n.to_be_bytes());
    SerialNumber::from_slice(&bytes)
}

/// One trust domain's CA: a root and, optionally, an intermediate that signs the leaves.
#[derive(Debug)]
pub struct TrustDomainCa {
    pub trust_domain: String,
    root: CertifiedIssuer<'static, KeyPair>,
    intermediate: Option<CertifiedIssuer<'static, KeyPair>>,
}

/// A leaf certificate with its chain (leaf first, then intermediates; never the root) and key.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER.
    pub key_der: Vec<u8>,
    pub chain_pem: String,
    pub key_pem: String,
    pub serial: Vec<u8>,
}

impl Leaf {
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }

    /// Writes `<name>.pem` (the chain) and `<name>-key.pem` (mode 0600) into `dir`.
    pub fn write_pem(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert, &self.chain_pem).with_context(|| cert.display().to_string())?;
        write_private(&key, &self.key_pem)?;
        Ok((cert, key))
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| path.display().to_string())?;
    file.write_all(text.as_bytes())
        .with_context(|| path.display().to_string())
}

/// What a leaf looks like; [`LeafSpec::svid`] is a valid X509-SVID and the bad-cert matrix
/// changes one thing at a time.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
    pub key_usages: Vec<KeyUsagePurpose>,
    pub extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
    /// Sign with the leaf's own key instead of the CA.
    pub self_signed: bool,
}

impl LeafSpec {
    /// A valid SVID for `spiffe_id`, valid from an hour ago for a day.
    pub fn svid(spiffe_id: &str) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            uris: vec![spiffe_id.to_owned()],
            dns: Vec::new(),
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(1),
            is_ca: false,
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
            extended_key_usages: vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            self_signed: false,
        }
    }
}

/// The bad client certificates every verifier test goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadCert {
    /// notAfter in the past.
    Expired,
    /// notBefore in the future.
    NotYetValid,
    /// A valid SVID of `other.test` presented where only `example.test` is trusted.
    WrongTrustDomain,
    /// Claims `spiffe://example.test/...` but is signed by `other.test`'s CA.
    ForeignIssuer,
    /// Two URI SANs.
    TwoUriSans,
    /// A DNS SAN only.
    NoUriSan,
    /// cA=true with keyCertSign.
    CaAsLeaf,
    /// keyUsage keyCertSign only (no digitalSignature).
    WrongKeyUsage,
    /// Self-signed, with a SPIFFE ID of the trusted domain.
    SelfSigned,
}

impl BadCert {
    pub const ALL: [BadCert; 9] = [
        BadCert::Expired,
        BadCert::NotYetValid,
        BadCert::WrongTrustDomain,
        BadCert::ForeignIssuer,
        BadCert::TwoUriSans,
        BadCert::NoUriSan,
        BadCert::CaAsLeaf,
        BadCert::WrongKeyUsage,
        BadCert::SelfSigned,
    ];
}

fn key_pair() -> Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generate P-256 key")
}

fn ca_params(trust_domain: &str, common_name: &str, path_len: Option<u8>) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(365);
    params.serial_number = Some(next_serial());
    params.key_identifier_method = KeyIdMethod::Sha256;
    if let Ok(uri) = format!("spiffe://{trust_domain}").try_into() {
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    params
}

impl TrustDomainCa {
    pub fn new(trust_domain: &str, with_intermediate: bool) -> Result<TrustDomainCa> {
        let root = CertifiedIssuer::self_signed(
            ca_params(trust_domain, &format!("{trust_domain} root"), None),
            key_pair()?,
        )
        .context("self-sign root")?;
        let intermediate = if with_intermediate {
            Some(
                CertifiedIssuer::signed_by(
                    ca_params(
                        trust_domain,
                        &format!("{trust_domain} intermediate"),
                        Some(0),
                    ),
                    key_pair()?,
                    &root,
                )
                .context("sign intermediate")?,
            )
        } else {
            None
        };
        Ok(TrustDomainCa {
            trust_domain: trust_domain.to_owned(),
            root,
            intermediate,
        })
    }

    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root.der().clone()
    }

    pub fn root_pem(&self) -> String {
        self.root.pem()
    }

    /// Writes the root as `<name>.pem` into `dir` (a PEM trust bundle).
    pub fn write_bundle(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.root_pem()).with_context(|| path.display().to_string())?;
        Ok(path)
    }

    /// A valid SVID `spiffe://<trust domain><path>` (`path` starts with `/`).
    pub fn svid(&self, path: &str) -> Result<Leaf> {
        self.leaf(&LeafSpec::svid(&format!(
            "spiffe://{}{path}",
            self.trust_domain
        )))
    }

    /// A server certificate for DNS names (EKU serverAuth), no URI SAN.
    pub fn server(&self, dns: &[&str]) -> Result<Leaf> {
        let mut spec = LeafSpec::svid("");
        spec.uris.clear();
        spec.dns = dns.iter().map(|d| (*d).to_owned()).collect();
        spec.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.leaf(&spec)
    }

    /// A leaf as `spec` says, signed by the intermediate if there is one.
    pub fn leaf(&self, spec: &LeafSpec) -> Result<Leaf> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain.as_str());
        params.distinguished_name = dn;
        for uri in &spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into().context("URI SAN")?));
        }
        for dns in &spec.dns {
            params.subject_alt_names.push(SanType::DnsName(
                dns.as_str().try_into().context("DNS SAN")?,
            ));
        }
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.is_ca = if spec.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.key_usages = spec.key_usages.clone();
        params.extended_key_usages = spec.extended_key_usages.clone();
        let serial = next_serial();
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = !spec.self_signed;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let key = key_pair()?;
        let cert = if spec.self_signed {
            params.self_signed(&key).context("self-sign leaf")?
        } else {
            let issuer: &CertifiedIssuer<'static, KeyPair> =
                self.intermediate.as_ref().unwrap_or(&self.root);
            params.signed_by(&key, issuer).context("sign leaf")?
        };
        let mut chain = vec![cert.der().clone()];
        let mut chain_pem = cert.pem();
        if let (Some(intermediate), false) = (&self.intermediate, spec.self_signed) {
            chain.push(intermediate.der().clone());
            chain_pem.push_str(&intermediate.pem());
        }
        Ok(Leaf {
            chain,
            key_der: key.serialize_der(),
            chain_pem,
            key_pem: key.serialize_pem(),
            serial: serial.to_bytes(),
        })
    }

    /// A CRL from the certificate that signs leaves, revoking `revoked`.
    pub fn crl(&self, revoked: &[&Leaf]) -> Result<CertificateRevocationListDer<'static>> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(1),
            crl_number: next_serial(),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|leaf| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&leaf.serial),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer: &CertifiedIssuer<'static, KeyPair> =
            self.intermediate.as_ref().unwrap_or(&self.root);
        let crl = params.signed_by(issuer).context("sign CRL")?;
        Ok(crl.der().clone())
    }
}

/// Two trust domains: [`EXAMPLE`] (with an intermediate) and [`OTHER`] (root only).
#[derive(Debug)]
pub struct Pki {
    pub example: TrustDomainCa,
    pub other: TrustDomainCa,
}

impl Pki {
    pub fn new() -> Result<Pki> {
        Ok(Pki {
            example: TrustDomainCa::new(EXAMPLE, true)?,
            other: TrustDomainCa::new(OTHER, false)?,
        })
    }

    /// A bad client certificate; all but [`BadCert::WrongTrustDomain`] claim an
    /// `example.test` identity.
    pub fn bad_client(&self, bad: BadCert) -> Result<Leaf> {
        let id = format!("spiffe://{EXAMPLE}/bad/{bad:?}");
        let mut spec = LeafSpec::svid(&id);
        let now = OffsetDateTime::now_utc();
        let ca = &self.example;
        match bad {
            BadCert::Expired => {
                spec.not_before = now - Duration::days(10);
                spec.not_after = now - Duration::days(1);
            }
            BadCert::NotYetValid => {
                spec.not_before = now + Duration::days(1);
                spec.not_after = now + Duration::days(10);
            }
            BadCert::WrongTrustDomain => return self.other.svid("/client"),
            BadCert::ForeignIssuer => return self.other.leaf(&spec),
            BadCert::TwoUriSans => spec.uris.push(format!("spiffe://{EXAMPLE}/second")),
            BadCert::NoUriSan => {
                spec.uris.clear();
                spec.dns = vec!["client.example.test".to_owned()];
            }
            BadCert::CaAsLeaf => {
                spec.is_ca = true;
                spec.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
            }
            BadCert::WrongKeyUsage => spec.key_usages = vec![KeyUsagePurpose::KeyCertSign],
            BadCert::SelfSigned => spec.self_signed = true,
        }
        ca.leaf(&spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_chains_and_the_bad_matrix() -> Result<()> {
        let pki = Pki::new()?;
        let svid = pki.example.svid("/client")?;
        assert_eq!(svid.chain.len(), 2, "leaf + intermediate");
        assert!(svid.chain_pem.matches("BEGIN CERTIFICATE").count() == 2);
        assert!(svid.key_pem.contains("BEGIN PRIVATE KEY"));
        assert_eq!(pki.other.svid("/x")?.chain.len(), 1);
        for bad in BadCert::ALL {
            pki.bad_client(bad)?;
        }
        let crl = pki.example.crl(&[&svid])?;
        assert!(!crl.is_empty());
        let dir = tempfile::tempdir()?;
        let (cert, key) = svid.write_pem(dir.path(), "client")?;
        assert!(cert.ends_with("client.pem") && key.ends_with("client-key.pem"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
        Ok(())
    }
}

/// Two trust domains, `example.test` (the gateway's) and `other.test` (a stranger's), with
/// their files written to one temporary directory: what the TLS integration tests share.
#[derive(Debug)]
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub example: TrustDomainCa,
    pub other: TrustDomainCa,
}

impl TestPki {
    pub fn new() -> TestPki {
        TestPki {
            dir: tempfile::tempdir().expect("tempdir"),
            example: TrustDomainCa::new("example.test", false).expect("ca"),
            other: TrustDomainCa::new("other.test", false).expect("ca"),
        }
    }

    /// A server certificate of `example.test` for `dns`, written as `name`.
    pub fn server(&self, name: &str, dns: &[&str]) -> (PathBuf, PathBuf) {
        self.example
            .server(dns)
            .expect("server cert")
            .write_pem(self.dir.path(), name)
            .expect("write")
    }

    /// The gateway's certificate: an SVID (`spiffe://example.test/gateway`) that is also valid
    /// for `gateway.example.test`.
    pub fn gateway(&self) -> (PathBuf, PathBuf) {
        let mut spec = LeafSpec::svid("spiffe://example.test/gateway");
        spec.dns = vec!["gateway.example.test".to_owned()];
        self.example
            .leaf(&spec)
            .expect("server cert")
            .write_pem(self.dir.path(), "server")
            .expect("write")
    }

    /// An SVID of `ca` for `path`, written as `name`.
    pub fn svid(&self, ca: &TrustDomainCa, name: &str, path: &str) -> (PathBuf, PathBuf) {
        ca.svid(path)
            .expect("svid")
            .write_pem(self.dir.path(), name)
            .expect("write")
    }

    /// `ca`'s bundle, written as `name`.
    pub fn bundle(&self, ca: &TrustDomainCa, name: &str) -> PathBuf {
        ca.write_bundle(self.dir.path(), name).expect("bundle")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}
