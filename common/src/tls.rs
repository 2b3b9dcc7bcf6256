//! TLS helpers: the one crypto provider, loading PEM files, server and client configs, and
//! reading an agent's identity off its certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Installs the process-wide rustls crypto provider (ring). Call first in `main` and in test
/// harnesses; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads every certificate of a PEM file; an empty file is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("certificate file {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("certificate file {}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("private key file {}: {e}", path.display()))
}

fn roots(ca: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| format!("CA file {}: {e}", ca.display()))?;
    }
    Ok(roots)
}

/// The collector's receive side: TLS 1.2+, and a required client certificate signed by
/// `client_ca` when given (mTLS).
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerConfig, String> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let builder = ServerConfig::builder();
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots(ca)?))
                .build()
                .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate {} and its key: {e}", cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The server's order of cipher suites wins (strongest first), whatever a client prefers.
    config.ignore_client_order = true;
    Ok(config)
}

/// The agent's shipping side: the server is verified against `ca` (hostname included); with
/// `cert` and `key`, a client certificate is presented (mTLS).
pub fn client_config(ca: &Path, cert_and_key: Option<(&Path, &Path)>) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder().with_root_certificates(roots(ca)?);
    let mut config = match cert_and_key {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| format!("client certificate {}: {e}", cert.display()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// System CA bundles, tried in order when no CA file is configured.
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// The proxy's side towards an `https://` license server: verified against `ca`, or the
/// system's CA bundle when none is given.
pub fn upstream_client_config(ca: Option<&Path>) -> Result<ClientConfig, String> {
    let path = match ca {
        Some(p) => p.to_path_buf(),
        None => SYSTEM_BUNDLES
            .iter()
            .map(Path::new)
            .find(|p| p.exists())
            .ok_or("no system CA bundle found (looked in /etc/ssl and /etc/pki); set proxy.upstream_ca")?
            .to_path_buf(),
    };
    client_config(&path, None)
}

/// The subject common name of a DER certificate: the agent id of an mTLS peer.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// TLS material that follows its files: `current()` re-reads them when their modification
/// time, size or inode changed (checked at most once per [`RELOAD_CHECK_EVERY`]), so
/// certificates and CAs can be rotated without a restart. A failed rebuild keeps the previous
/// material and logs why; the initial build must succeed.
pub struct Reloading<T> {
    what: &'static str,
    paths: Vec<std::path::PathBuf>,
    build: Box<dyn Fn() -> Result<T, String> + Send + Sync>,
    state: std::sync::Mutex<ReloadState<T>>,
}

/// How often the files behind a [`Reloading`] are looked at.
pub const RELOAD_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

type Stamp = Option<(std::time::SystemTime, u64, u64)>;

struct ReloadState<T> {
    current: Arc<T>,
    stamps: Vec<Stamp>,
    checked: std::time::Instant,
}

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

impl<T> Reloading<T> {
    pub fn new(
        what: &'static str,
        paths: Vec<std::path::PathBuf>,
        build: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let stamps = paths.iter().map(|p| stamp(p)).collect();
        let current = Arc::new(build()?);
        Ok(Reloading {
            what,
            paths,
            build: Box::new(build),
            state: std::sync::Mutex::new(ReloadState {
                current,
                stamps,
                checked: std::time::Instant::now(),
            }),
        })
    }

    /// The material to use for a new connection.
    pub fn current(&self) -> Arc<T> {
        let mut st = self.state.lock().expect("tls reload state");
        if st.checked.elapsed() >= RELOAD_CHECK_EVERY {
            st.checked = std::time::Instant::now();
            let stamps: Vec<Stamp> = self.paths.iter().map(|p| stamp(p)).collect();
            if stamps != st.stamps {
                match (self.build)() {
                    Ok(t) => {
                        st.current = Arc::new(t);
                        st.stamps = stamps;
                        tracing::info!(what = self.what, "TLS files changed: reloaded");
                    }
                    Err(e) => {
                        // Keep serving with what worked; try again when the files change again.
                        st.stamps = stamps;
                        tracing::error!(what = self.what, error = %e, "TLS files changed but cannot be used: keeping the previous ones");
                    }
                }
            }
        }
        Arc::clone(&st.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_when_a_file_changes_and_keeps_the_old_on_error() {
        let dir = std::env::temp_dir().join(format!("kt-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("material");
        std::fs::write(&f, "1").unwrap();
        let path = f.clone();
        let r = Reloading::new("test", vec![f.clone()], move || {
            let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
            text.trim().parse::<u32>().map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(*r.current(), 1);
        // Replace the file (new inode), as certificate rotation tools do.
        std::fs::write(dir.join("next"), "2").unwrap();
        std::fs::rename(dir.join("next"), &f).unwrap();
        std::thread::sleep(RELOAD_CHECK_EVERY);
        assert_eq!(*r.current(), 2);
        std::fs::write(dir.join("next"), "not a number").unwrap();
        std::fs::rename(dir.join("next"), &f).unwrap();
        std::thread::sleep(RELOAD_CHECK_EVERY);
        assert_eq!(*r.current(), 2, "a broken file keeps the previous material");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
