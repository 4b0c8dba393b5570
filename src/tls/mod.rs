//! Mutual TLS on the control plane. The coordinator and every worker present a certificate
//! signed by the job's CA and trust only that CA: a client without such a certificate is
//! refused in the handshake, and the job token (a second factor) never crosses the wire in
//! clear. Plaintext needs an explicit `--insecure`, and says so on every start.
//!
//! A TLS directory holds `ca.pem` plus `<role>.pem` and `<role>.key` (what `tandem certs init`
//! writes), or the `ca.crt`, `tls.crt`, `tls.key` of a Kubernetes TLS Secret (cert-manager).

#![warn(missing_docs)]

pub mod certs;

use std::path::{Path, PathBuf};

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// How long a TLS handshake may take before the connection is dropped (so silent
/// connections cannot pile up).
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Which side of the control plane a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The coordinator: a TLS server certificate.
    Coordinator,
    /// A worker (or `launch` watching its job): a TLS client certificate.
    Worker,
}

impl Role {
    /// `coordinator` or `worker`: the stem of the role's files in a TLS directory.
    pub fn file_stem(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
        }
    }
}

/// The PEM files one process presents (`cert`, `key`) and trusts (`ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The job's CA certificate.
    pub ca: PathBuf,
    /// This process's certificate (chain).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files for `role` in `dir`: `ca.pem`, `<role>.pem`, `<role>.key`, or a TLS Secret's
    /// `ca.crt`, `tls.crt`, `tls.key`.
    pub fn find(dir: &Path, role: Role) -> anyhow::Result<TlsFiles> {
        let stem = role.file_stem();
        let pick = |names: &[String]| -> anyhow::Result<PathBuf> {
            names
                .iter()
                .map(|n| dir.join(n))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "TLS directory {}: none of {} found (make the job's certificates with \
                         `tandem certs init --dir {}`)",
                        dir.display(),
                        names.join(", "),
                        dir.display()
                    )
                })
        };
        Ok(TlsFiles {
            ca: pick(&["ca.pem".into(), "ca.crt".into()])?,
            cert: pick(&[format!("{stem}.pem"), "tls.crt".into()])?,
            key: pick(&[format!("{stem}.key"), "tls.key".into()])?,
        })
    }

    fn read(&self) -> anyhow::Result<(Vec<u8>, Identity)> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let (ca, cert, key) = (read(&self.ca)?, read(&self.cert)?, read(&self.key)?);
        check_certificate(&self.ca, &ca)?;
        check_certificate(&self.cert, &cert)?;
        anyhow::ensure!(
            String::from_utf8_lossy(&key).contains("PRIVATE KEY-----"),
            "{}: no PEM private key in it",
            self.key.display()
        );
        Ok((ca, Identity::from_pem(cert, key)))
    }
}

/// A readable message now for what would otherwise fail later as an opaque handshake error:
/// not PEM, not a certificate, or outside its validity period.
fn check_certificate(path: &Path, pem: &[u8]) -> anyhow::Result<()> {
    let bad = |why: String| anyhow::anyhow!("{}: {why}", path.display());
    let (_, block) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|_| bad("no PEM block in it (expected a certificate)".into()))?;
    let cert = block
        .parse_x509()
        .map_err(|e| bad(format!("not an X.509 certificate ({e})")))?;
    let v = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > v.not_after {
        return Err(bad(format!(
            "the certificate expired on {} (issue a new one with `tandem certs issue`)",
            v.not_after
        )));
    }
    if now < v.not_before {
        return Err(bad(format!(
            "the certificate is not valid before {} (is this machine's clock right?)",
            v.not_before
        )));
    }
    Ok(())
}

/// How a process secures its control-plane connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// Mutual TLS with the job's certificates.
    Mutual(TlsFiles),
    /// Plaintext HTTP/2 (`--insecure`): the token and everything else travel in clear.
    Insecure,
}

impl Security {
    /// From the command line: `--tls-dir` or `--insecure`, exactly one.
    pub fn from_args(tls_dir: Option<&Path>, insecure: bool, role: Role) -> anyhow::Result<Self> {
        match (tls_dir, insecure) {
            (Some(_), true) => anyhow::bail!("--tls-dir and --insecure exclude each other"),
            (Some(dir), false) => Ok(Security::Mutual(TlsFiles::find(dir, role)?)),
            (None, true) => Ok(Security::Insecure),
            (None, false) => anyhow::bail!(
                "no TLS certificates: pass --tls-dir DIR (or set TANDEM_TLS_DIR) with the job's \
                 certificates (make them with `tandem certs init --dir DIR`), or --insecure to \
                 run the control plane in plaintext on a network you trust"
            ),
        }
    }

    /// Logs, on every start, what `--insecure` gives away.
    pub fn warn_if_insecure(&self, who: &str) {
        if *self == Security::Insecure {
            tracing::warn!(
                "{who}: --insecure: the control plane is plaintext HTTP/2; the job token, \
                 assignments and checkpoints can be read and altered by anyone on the network"
            );
        }
    }

    /// The URL scheme connections use: `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Security::Mutual(_) => "https",
            Security::Insecure => "http",
        }
    }

    /// The server side: our certificate, and client certificates required from the job's CA.
    pub fn server_config(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let Security::Mutual(files) = self else {
            return Ok(None);
        };
        let (ca, identity) = files.read()?;
        Ok(Some(
            ServerTlsConfig::new()
                .identity(identity)
                .client_ca_root(Certificate::from_pem(ca))
                .timeout(HANDSHAKE_TIMEOUT),
        ))
    }

    /// The client side: the coordinator must show a certificate from the job's CA for the
    /// URL's host (or `server_name`), and we show ours.
    pub fn client_config(
        &self,
        server_name: Option<&str>,
    ) -> anyhow::Result<Option<ClientTlsConfig>> {
        let Security::Mutual(files) = self else {
            return Ok(None);
        };
        let (ca, identity) = files.read()?;
        let mut c = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(identity)
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(name) = server_name {
            c = c.domain_name(name);
        }
        Ok(Some(c))
    }
}
