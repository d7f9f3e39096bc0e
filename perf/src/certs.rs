//! The certificates every TLS scenario uses, generated once per run (ECDSA P-256, one CA):
//! the same server certificate for meshgate, haproxy and nginx, a client X509-SVID for mTLS,
//! and the origin's and the gateway's SVIDs for mTLS origination. Written as PEM files under
//! `<results>/certs/` (keys 0600); haproxy's certificate+key bundles too.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use meshgate_testkit::pki::{Leaf, LeafSpec, TrustDomainCa};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Trust domain of every certificate here.
pub const TRUST_DOMAIN: &str = "bench.test";
/// SNI the clients send and the name on the proxies' certificate.
pub const SERVER_NAME: &str = "bench.test";
/// DNS name on the origin's certificate (nginx and haproxy verify upstream names by DNS).
pub const ORIGIN_NAME: &str = "origin.bench.test";
pub const ORIGIN_ID: &str = "spiffe://bench.test/origin";

/// One certificate on disk.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Chain then key in one file (haproxy's `crt`).
    pub combined: PathBuf,
    pub leaf: Leaf,
}

#[derive(Debug)]
pub struct Certs {
    pub ca: PathBuf,
    /// The proxies' certificate (DNS `bench.test`).
    pub server: Pem,
    /// The load generator's client SVID (mTLS scenarios).
    pub client: Pem,
    /// The origin's SVID (+ DNS name) on its mTLS port.
    pub origin: Pem,
    /// The proxies' client SVID towards the origin.
    pub gateway: Pem,
}

impl Certs {
    pub fn generate(dir: &Path) -> Result<Arc<Certs>> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = TrustDomainCa::new(TRUST_DOMAIN, false)?;
        let ca_path = ca.write_bundle(dir, "ca")?;
        let mut server = LeafSpec::svid("");
        server.uris.clear();
        server.dns = vec![SERVER_NAME.into()];
        let mut origin = LeafSpec::svid(ORIGIN_ID);
        origin.dns = vec![ORIGIN_NAME.into()];
        let write = |leaf: Leaf, name: &str| -> Result<Pem> {
            let (cert, key) = leaf.write_pem(dir, name)?;
            let combined = dir.join(format!("{name}-combined.pem"));
            fs::write(&combined, format!("{}{}", leaf.chain_pem, leaf.key_pem))
                .with_context(|| combined.display().to_string())?;
            restrict(&combined)?;
            Ok(Pem {
                cert,
                key,
                combined,
                leaf,
            })
        };
        Ok(Arc::new(Certs {
            ca: ca_path,
            server: write(ca.leaf(&server)?, "server")?,
            client: write(ca.svid("/client")?, "client")?,
            origin: write(ca.leaf(&origin)?, "origin")?,
            gateway: write(ca.svid("/gateway")?, "gateway")?,
        }))
    }

    /// The client SVID as rustls wants it.
    pub fn client_identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.client.leaf.chain.clone(), self.client.leaf.key())
    }
}

fn restrict(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))
}
