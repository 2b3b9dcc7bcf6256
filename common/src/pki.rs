//! `keytrail-collector certs`: a development PKI, so nobody needs openssl to try keytrail.
//!
//! Writes `ca.crt`/`ca.key`, `collector.crt`/`collector.key` (server auth, SANs = hosts) and
//! `<agent>.crt`/`<agent>.key` (client auth, CN = agent id). An existing CA in the directory is
//! reused, so agents can be added later. Keys are written with mode 0600. Not for production:
//! the CA key sits next to the certificates.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// What was written, for the command to print.
pub struct Written {
    pub files: Vec<String>,
    pub reused_ca: bool,
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), String> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = private;
    let mut f = opts.open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(contents.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
        && name != "ca"
        && name != "collector"
}

/// Writes the PKI into `out` (created if missing).
pub fn write_dev_pki(out: &Path, hosts: &[String], agents: &[String]) -> Result<Written, String> {
    for a in agents {
        if !valid_name(a) {
            return Err(format!(
                "agent name {a:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.', not 'ca' or 'collector'"
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let err = |what: &str, e: rcgen::Error| format!("{what}: {e}");
    let mut files = Vec::new();
    let (ca_crt, ca_key) = (out.join("ca.crt"), out.join("ca.key"));
    let reused_ca = ca_crt.exists() && ca_key.exists();
    let (ca_cert, ca_keypair) = if reused_ca {
        let key_pem = std::fs::read_to_string(&ca_key).map_err(|e| format!("{}: {e}", ca_key.display()))?;
        let crt_pem = std::fs::read_to_string(&ca_crt).map_err(|e| format!("{}: {e}", ca_crt.display()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| err("existing ca.key", e))?;
        let params = CertificateParams::from_ca_cert_pem(&crt_pem).map_err(|e| err("existing ca.crt", e))?;
        let cert = params.self_signed(&key).map_err(|e| err("existing CA", e))?;
        (cert, key)
    } else {
        let key = KeyPair::generate().map_err(|e| err("CA key", e))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| err("CA", e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "keytrail development CA");
        dn.push(DnType::OrganizationName, "keytrail");
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, 3650);
        let cert = params.self_signed(&key).map_err(|e| err("CA", e))?;
        write_file(&ca_crt, &cert.pem(), false)?;
        write_file(&ca_key, &key.serialize_pem(), true)?;
        files.extend(["ca.crt".to_string(), "ca.key".to_string()]);
        (cert, key)
    };

    let hosts: Vec<String> = if hosts.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into()]
    } else {
        hosts.to_vec()
    };
    let key = KeyPair::generate().map_err(|e| err("collector key", e))?;
    let mut params = CertificateParams::new(hosts.clone()).map_err(|e| err("collector host names", e))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, hosts[0].clone());
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, 825);
    let cert = params
        .signed_by(&key, &ca_cert, &ca_keypair)
        .map_err(|e| err("collector certificate", e))?;
    write_file(&out.join("collector.crt"), &cert.pem(), false)?;
    write_file(&out.join("collector.key"), &key.serialize_pem(), true)?;
    files.extend(["collector.crt".to_string(), "collector.key".to_string()]);

    for agent in agents {
        let key = KeyPair::generate().map_err(|e| err("agent key", e))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| err("agent", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agent.clone());
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 825);
        let cert = params
            .signed_by(&key, &ca_cert, &ca_keypair)
            .map_err(|e| err("agent certificate", e))?;
        write_file(&out.join(format!("{agent}.crt")), &cert.pem(), false)?;
        write_file(&out.join(format!("{agent}.key")), &key.serialize_pem(), true)?;
        files.extend([format!("{agent}.crt"), format!("{agent}.key")]);
    }
    Ok(Written { files, reused_ca })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pki_chains_and_names_agents() {
        crate::tls::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("kt-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_dev_pki(&dir, &[], &["agent-a".into()]).unwrap();
        let second = write_dev_pki(&dir, &[], &["agent-b".into()]).unwrap();
        assert!(second.reused_ca);
        for a in ["agent-a", "agent-b"] {
            let certs = crate::tls::load_certs(&dir.join(format!("{a}.crt"))).unwrap();
            assert_eq!(crate::tls::common_name(&certs[0]).as_deref(), Some(a));
            // Both the server and the client side accept the files.
            crate::tls::client_config(
                &dir.join("ca.crt"),
                Some((&dir.join(format!("{a}.crt")), &dir.join(format!("{a}.key")))),
            )
            .unwrap();
        }
        crate::tls::server_config(
            &dir.join("collector.crt"),
            &dir.join("collector.key"),
            Some(&dir.join("ca.crt")),
        )
        .unwrap();
        assert!(write_dev_pki(&dir, &[], &["../evil".into()]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
