//! The SPIFFE Workload API messages meshgate sends (proto3, from the SPIFFE `workload.proto`),
//! encoded by hand: they are a few `bytes`/`string` fields, a `repeated bytes` and a
//! `map<string, bytes>`, and the requests meshgate reads are empty. Plus gRPC's message framing.
//!
//! ```text
//! message X509SVIDResponse { repeated X509SVID svids = 1; repeated bytes crl = 2;
//!                            map<string, bytes> federated_bundles = 3; }
//! message X509SVID { string spiffe_id = 1; bytes x509_svid = 2; bytes x509_svid_key = 3;
//!                    bytes bundle = 4; string hint = 5; }
//! message X509BundlesResponse { repeated bytes crl = 1; map<string, bytes> bundles = 2; }
//! ```

/// One X509-SVID as the Workload API carries it: all DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Svid {
    pub spiffe_id: String,
    /// The leaf, then intermediates, concatenated DER.
    pub cert_chain: Vec<u8>,
    /// PKCS#8 DER.
    pub key_pkcs8: Vec<u8>,
    /// The trust domain's roots, concatenated DER.
    pub bundle: Vec<u8>,
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn field(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    varint(out, (u64::from(number) << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn nonempty(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    // proto3: a default (empty) scalar is not sent.
    if !bytes.is_empty() {
        field(out, number, bytes);
    }
}

fn map_entry(key: &str, value: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(key.len() + value.len() + 8);
    nonempty(&mut e, 1, key.as_bytes());
    nonempty(&mut e, 2, value);
    e
}

/// `X509SVIDResponse`.
pub fn x509_svid_response(svids: &[X509Svid], crls: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in svids {
        let mut m = Vec::new();
        nonempty(&mut m, 1, s.spiffe_id.as_bytes());
        nonempty(&mut m, 2, &s.cert_chain);
        nonempty(&mut m, 3, &s.key_pkcs8);
        nonempty(&mut m, 4, &s.bundle);
        field(&mut out, 1, &m);
    }
    for c in crls {
        field(&mut out, 2, c);
    }
    out
}

/// `X509BundlesResponse`: `bundles` maps a trust domain's SPIFFE ID (`spiffe://td`) to its
/// roots, concatenated DER.
pub fn x509_bundles_response(bundles: &[(String, Vec<u8>)], crls: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in crls {
        field(&mut out, 1, c);
    }
    for (td, roots) in bundles {
        field(&mut out, 2, &map_entry(td, roots));
    }
    out
}

/// One gRPC message on the wire: uncompressed flag, 4-byte big-endian length, the message.
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_protoc() {
        // Reference bytes worked out from the protobuf encoding rules.
        let svid = X509Svid {
            spiffe_id: "spiffe://t/w".into(),
            cert_chain: vec![1, 2],
            key_pkcs8: vec![3],
            bundle: vec![],
        };
        let got = x509_svid_response(&[svid], &[vec![9]]);
        let mut inner = vec![0x0a, 12];
        inner.extend_from_slice(b"spiffe://t/w");
        inner.extend_from_slice(&[0x12, 2, 1, 2, 0x1a, 1, 3]);
        let mut want = vec![0x0a, inner.len() as u8];
        want.extend_from_slice(&inner);
        want.extend_from_slice(&[0x12, 1, 9]);
        assert_eq!(got, want);

        let b = x509_bundles_response(&[("spiffe://t".into(), vec![7; 200])], &[]);
        // field 2, length 200 + 2 + 10 + 3 = 215 as a two-byte varint (0xd7 0x01).
        assert_eq!(&b[..3], &[0x12, 0xd7, 0x01]);
        assert_eq!(&b[3..5], &[0x0a, 10]);

        assert_eq!(grpc_frame(&[5, 6]), vec![0, 0, 0, 0, 2, 5, 6]);
    }
}
