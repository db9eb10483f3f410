//! Certificates for the TLS tests, made by openssl.

use super::sha256;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// Certificates for the TLS tests, made by openssl: a CA and the daemon's certificate for
/// "localhost" signed by it, and self-signed client certificates for terminals and sites.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let d = |f: &str| dir.join(f).display().to_string();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        let (ca_key, ca_crt) = (d("ca.key"), d("ca.crt"));
        a.extend([
            "-keyout",
            &ca_key,
            "-out",
            &ca_crt,
            "-subj",
            "/CN=test ca",
            "-days",
            "2",
        ]);
        openssl(&a);
        let (sk, csr, scrt, ext) = (
            d("server.key"),
            d("server.csr"),
            d("server.crt"),
            d("server.ext"),
        );
        std::fs::write(
            &ext,
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", &sk, "-out", &csr, "-subj", "/CN=localhost"]);
        openssl(&a);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &scrt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
        Pki {
            dir: dir.to_owned(),
        }
    }

    /// A self-signed client certificate; returns its SHA-256 (hex, of the DER).
    pub fn client(&self, name: &str) -> String {
        let (k, c) = (
            self.path(&format!("{name}.key")),
            self.path(&format!("{name}.crt")),
        );
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &k,
            "-out",
            &c,
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=clientAuth",
        ]);
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_file(&c).unwrap();
        hex::encode(sha256(der.as_ref()))
    }

    pub fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }
}
