//! Node identity: a cluster CA, node certificates it issues, and the mutual
//! TLS 1.3 configurations built from them.
//!
//! Files:
//! - cluster dir (`dwcp cluster init --dir D`): `ca.pem`, `ca.key` (0600).
//! - node dir (`dwcp cluster issue --dir D --node N --out O`): `node.pem`,
//!   `node.key` (0600), and a copy of `ca.pem`.
//!
//! The node's own certificate and key are re-read when their files change
//! (checked at each handshake), so a certificate can be rotated by writing
//! new files, without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("{0} already holds a cluster CA (refusing to overwrite it)")]
    CaExists(PathBuf),
    #[error("node name {0:?}: use 1-63 lower-case letters, digits and '-'")]
    BadName(String),
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("TLS configuration failed: {0}")]
    Tls(String),
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, data: &[u8], private: bool) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(|source| IdentityError::Write {
            path: tmp.clone(),
            source,
        })?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|source| IdentityError::Write {
            path: path.to_owned(),
            source,
        })
}

fn gen_err(e: rcgen::Error) -> IdentityError {
    IdentityError::Generate(e.to_string())
}

pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // Each cluster's CA has a name of its own, so a certificate from another
    // cluster is refused as from an unknown issuer.
    let id = blake3::hash(format!("{:?} {}", SystemTime::now(), std::process::id()).as_bytes());
    let id: String = id.as_bytes()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    dn.push(DnType::CommonName, format!("dwcp cluster CA {id}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Creates a cluster CA in `dir`, valid for `validity`.
pub fn init_ca(dir: &Path, validity: Duration) -> Result<(), IdentityError> {
    std::fs::create_dir_all(dir).map_err(|source| IdentityError::Write {
        path: dir.to_owned(),
        source,
    })?;
    if dir.join("ca.key").exists() || dir.join("ca.pem").exists() {
        return Err(IdentityError::CaExists(dir.to_owned()));
    }
    let mut p = ca_params();
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + time::Duration::seconds(validity.as_secs() as i64);
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = p.self_signed(&key).map_err(gen_err)?;
    write(&dir.join("ca.key"), key.serialize_pem().as_bytes(), true)?;
    write(&dir.join("ca.pem"), cert.pem().as_bytes(), false)?;
    Ok(())
}

/// Issues a key and certificate for node `name`, signed by the CA in
/// `ca_dir`, into `out` (with a copy of `ca.pem`). The certificate is valid
/// from `not_before` for `validity`.
pub fn issue_node(
    ca_dir: &Path,
    name: &str,
    out: &Path,
    validity: Duration,
) -> Result<(), IdentityError> {
    if !valid_node_name(name) {
        return Err(IdentityError::BadName(name.to_owned()));
    }
    let ca_pem = String::from_utf8_lossy(&read(&ca_dir.join("ca.pem"))?).into_owned();
    let ca_key_pem = String::from_utf8_lossy(&read(&ca_dir.join("ca.key"))?).into_owned();
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|_| IdentityError::Pem {
        path: ca_dir.join("ca.key"),
        what: "CA key",
    })?;
    let ca_params =
        CertificateParams::from_ca_cert_pem(&ca_pem).map_err(|_| IdentityError::Pem {
            path: ca_dir.join("ca.pem"),
            what: "CA certificate",
        })?;
    let ca = ca_params.self_signed(&ca_key).map_err(gen_err)?;
    let mut p = CertificateParams::new(vec![name.to_owned()]).map_err(gen_err)?;
    p.subject_alt_names = vec![SanType::DnsName(name.try_into().map_err(gen_err)?)];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + time::Duration::seconds(validity.as_secs() as i64);
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = p.signed_by(&key, &ca, &ca_key).map_err(gen_err)?;
    std::fs::create_dir_all(out).map_err(|source| IdentityError::Write {
        path: out.to_owned(),
        source,
    })?;
    write(&out.join("node.key"), key.serialize_pem().as_bytes(), true)?;
    write(&out.join("node.pem"), cert.pem().as_bytes(), false)?;
    write(&out.join("ca.pem"), ca_pem.as_bytes(), false)?;
    Ok(())
}

/// The node name (first DNS subject alternative name) in a certificate.
pub fn cert_node_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = c.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|g| match g {
        x509_parser::extensions::GeneralName::DNSName(n) => Some(n.to_string()),
        _ => None,
    })
}

/// When a certificate expires.
pub fn cert_not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = c.validity().not_after.timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Loaded {
    key: Arc<CertifiedKey>,
    name: String,
    stamp: (Option<SystemTime>, Option<SystemTime>),
}

/// This node's certificate and key, re-read when their files change.
pub struct NodeIdentity {
    dir: PathBuf,
    loaded: Mutex<Loaded>,
    roots: Arc<RootCertStore>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl NodeIdentity {
    /// Loads `node.pem`, `node.key` and `ca.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Arc<NodeIdentity>, IdentityError> {
        let ca_path = dir.join("ca.pem");
        let mut roots = RootCertStore::empty();
        let ca_pem = read(&ca_path)?;
        for c in CertificateDer::pem_slice_iter(&ca_pem) {
            let c = c.map_err(|_| IdentityError::Pem {
                path: ca_path.clone(),
                what: "certificate",
            })?;
            roots
                .add(c)
                .map_err(|e| IdentityError::Tls(format!("{}: {e}", ca_path.display())))?;
        }
        if roots.is_empty() {
            return Err(IdentityError::Pem {
                path: ca_path,
                what: "CA certificate",
            });
        }
        let loaded = Self::read_key(dir)?;
        Ok(Arc::new(NodeIdentity {
            dir: dir.to_owned(),
            loaded: Mutex::new(loaded),
            roots: Arc::new(roots),
        }))
    }

    fn read_key(dir: &Path) -> Result<Loaded, IdentityError> {
        let cert_path = dir.join("node.pem");
        let key_path = dir.join("node.key");
        let stamp = (mtime(&cert_path), mtime(&key_path));
        let cert_pem = read(&cert_path)?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|_| IdentityError::Pem {
                path: cert_path.clone(),
                what: "certificate",
            })?;
        let first = certs.first().ok_or_else(|| IdentityError::Pem {
            path: cert_path.clone(),
            what: "certificate",
        })?;
        let name = cert_node_name(first).ok_or_else(|| IdentityError::Pem {
            path: cert_path.clone(),
            what: "node certificate (no DNS name)",
        })?;
        let key =
            PrivateKeyDer::from_pem_slice(&read(&key_path)?).map_err(|_| IdentityError::Pem {
                path: key_path.clone(),
                what: "private key",
            })?;
        let signer = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| IdentityError::Tls(format!("{}: {e}", key_path.display())))?;
        Ok(Loaded {
            key: Arc::new(CertifiedKey::new(certs, signer)),
            name,
            stamp,
        })
    }

    /// The current key, re-read first if the files changed. A broken new
    /// file keeps the old key (and says so in the log).
    fn current(&self) -> Arc<CertifiedKey> {
        let mut l = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = (
            mtime(&self.dir.join("node.pem")),
            mtime(&self.dir.join("node.key")),
        );
        if stamp != l.stamp {
            match Self::read_key(&self.dir) {
                Ok(new) => {
                    tracing::info!(node = %new.name, dir = %self.dir.display(), "node certificate reloaded");
                    *l = new;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "new node certificate unusable; keeping the old one");
                    l.stamp = stamp;
                }
            }
        }
        l.key.clone()
    }

    /// This node's name, from its certificate.
    pub fn name(&self) -> String {
        self.current();
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .name
            .clone()
    }

    /// When this node's certificate expires.
    pub fn not_after(&self) -> Option<SystemTime> {
        self.current().cert.first().and_then(cert_not_after)
    }

    /// TLS 1.3 server config: clients must present a certificate from the
    /// cluster CA.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, IdentityError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let mut c = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.clone());
        c.alpn_protocols = vec![crate::ALPN.to_vec()];
        Ok(Arc::new(c))
    }

    /// TLS 1.3 client config. With `expect`, the server's certificate must
    /// name that node; without, any node of the cluster is accepted (its
    /// name is logged by the caller).
    pub fn client_config(
        self: &Arc<Self>,
        expect: Option<&str>,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let webpki = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let verifier = Arc::new(ClusterServerVerifier {
            inner: webpki,
            any_name: expect.is_none(),
        });
        let mut c = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(self.clone());
        c.alpn_protocols = vec![crate::ALPN.to_vec()];
        Ok(Arc::new(c))
    }
}

impl ResolvesServerCert for NodeIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for NodeIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The standard verifier (chain to the cluster CA, validity period), with
/// the name check waived when the caller accepts any cluster node.
#[derive(Debug)]
struct ClusterServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    any_name: bool,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // webpki checks the chain and the dates before the name: a name
            // mismatch means everything else was in order.
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if self.any_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_issues_nodes_and_refuses_overwrite() {
        let d = tempfile::tempdir().expect("tmp");
        let ca = d.path().join("ca");
        init_ca(&ca, Duration::from_secs(86400)).expect("init");
        assert!(matches!(
            init_ca(&ca, Duration::from_secs(86400)),
            Err(IdentityError::CaExists(_))
        ));
        let out = d.path().join("n1");
        issue_node(&ca, "node-1", &out, Duration::from_secs(3600)).expect("issue");
        let id = NodeIdentity::load(&out).expect("load");
        assert_eq!(id.name(), "node-1");
        let left = id
            .not_after()
            .expect("expiry")
            .duration_since(SystemTime::now())
            .expect("future");
        assert!(left <= Duration::from_secs(3600) && left > Duration::from_secs(3500));
        assert!(id.server_config().is_ok() && id.client_config(Some("node-2")).is_ok());
        assert!(matches!(
            issue_node(&ca, "Bad Name", &out, Duration::from_secs(1)),
            Err(IdentityError::BadName(_))
        ));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(out.join("node.key"))
                .expect("meta")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
