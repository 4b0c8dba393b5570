//! The job's certificates: a per-job CA, and coordinator/worker certificates it signs
//! (`tandem certs init|issue`, and `tandem launch` by itself). Keys are ECDSA P-256, written
//! 0600; the CA key stays where `init` ran and is needed only to issue more.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use super::Role;

/// Names every coordinator certificate carries: the Kubernetes service (`deploy/`) and
/// loopback, so `launch` and in-cluster workers verify it with no options.
pub const DEFAULT_COORDINATOR_NAMES: &[&str] =
    &["tandem-coordinator", "localhost", "127.0.0.1", "::1"];

/// What `init` makes.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The directory the files go into (created 0700).
    pub dir: PathBuf,
    /// Extra names (DNS names or IP addresses) for the coordinator's certificate.
    pub coordinator_names: Vec<String>,
    /// Validity of every certificate, in days.
    pub days: u32,
    /// Replace files that exist (otherwise they are refused).
    pub force: bool,
}

/// Makes a new CA in `dir` (ca.pem, ca.key) and signs one coordinator and one worker
/// certificate with it. Returns the files written.
pub fn init(o: &InitOptions) -> anyhow::Result<Vec<PathBuf>> {
    anyhow::ensure!(o.days > 0, "--days must be at least 1");
    create_private_dir(&o.dir)?;
    let targets: Vec<PathBuf> = [
        "ca",
        Role::Coordinator.file_stem(),
        Role::Worker.file_stem(),
    ]
    .iter()
    .flat_map(|s| [format!("{s}.pem"), format!("{s}.key")])
    .map(|f| o.dir.join(f))
    .collect();
    if !o.force {
        if let Some(t) = targets.iter().find(|t| t.exists()) {
            anyhow::bail!(
                "{} exists: this directory already holds a CA (use `tandem certs issue` to sign \
                 more certificates with it, or --force to replace everything)",
                t.display()
            );
        }
    }
    let (ca_params, ca_key) = ca_params(o.days)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write_public(&o.dir.join("ca.pem"), &ca_cert.pem())?;
    write_private(&o.dir.join("ca.key"), &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut names: Vec<String> = DEFAULT_COORDINATOR_NAMES
        .iter()
        .map(|s| s.to_string())
        .collect();
    names.extend(o.coordinator_names.iter().cloned());
    let mut written = vec![o.dir.join("ca.pem"), o.dir.join("ca.key")];
    for (role, names) in [(Role::Coordinator, names), (Role::Worker, vec![])] {
        written.extend(issue_into(
            &issuer,
            role,
            "tandem",
            &names,
            o.days,
            &o.dir,
            role.file_stem(),
        )?);
    }
    Ok(written)
}

/// What `issue` makes.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// The directory holding ca.pem and ca.key.
    pub ca_dir: PathBuf,
    /// Coordinator (server) or worker (client) certificate.
    pub role: Role,
    /// Names (DNS or IP) the certificate carries; a coordinator's also gets the defaults.
    pub names: Vec<String>,
    /// Where to write `<stem>.pem` and `<stem>.key`.
    pub out_dir: PathBuf,
    /// The file stem (default: the role's, `coordinator` or `worker`).
    pub stem: Option<String>,
    /// Validity in days.
    pub days: u32,
}

/// Signs one more certificate with the CA in `ca_dir` (e.g. one per worker host, or a new
/// coordinator certificate with more names). Returns the files written.
pub fn issue(o: &IssueOptions) -> anyhow::Result<Vec<PathBuf>> {
    anyhow::ensure!(o.days > 0, "--days must be at least 1");
    let read = |name: &str| {
        let p = o.ca_dir.join(name);
        std::fs::read_to_string(&p).with_context(|| {
            format!(
                "reading {} (make a CA with `tandem certs init --dir {}`)",
                p.display(),
                o.ca_dir.display()
            )
        })
    };
    let (ca_pem, key_pem) = (read("ca.pem")?, read("ca.key")?);
    let key = KeyPair::from_pem(&key_pem).with_context(|| {
        format!(
            "{}: not a PEM private key",
            o.ca_dir.join("ca.key").display()
        )
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).with_context(|| {
        format!(
            "{}: not a PEM certificate",
            o.ca_dir.join("ca.pem").display()
        )
    })?;
    let mut names = o.names.clone();
    if o.role == Role::Coordinator {
        names.extend(DEFAULT_COORDINATOR_NAMES.iter().map(|s| s.to_string()));
    }
    create_private_dir(&o.out_dir)?;
    let stem = o.stem.as_deref().unwrap_or(o.role.file_stem());
    issue_into(&issuer, o.role, "tandem", &names, o.days, &o.out_dir, stem)
}

fn ca_params(days: u32) -> anyhow::Result<(CertificateParams, KeyPair)> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name.push(
        DnType::CommonName,
        format!("tandem job CA {}", crate::util::random_hex(6)),
    );
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, days);
    Ok((p, KeyPair::generate()?))
}

/// A coordinator certificate is for TLS servers only and a worker's for clients only, so
/// neither can stand in for the other.
fn issue_into(
    issuer: &Issuer<'_, KeyPair>,
    role: Role,
    org: &str,
    names: &[String],
    days: u32,
    dir: &Path,
    stem: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut names = names.to_vec();
    names.dedup();
    let mut p = CertificateParams::new(names.clone())
        .with_context(|| format!("invalid certificate name among {names:?}"))?;
    p.distinguished_name
        .push(DnType::OrganizationName, org.to_string());
    p.distinguished_name
        .push(DnType::CommonName, format!("tandem {}", role.file_stem()));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![match role {
        Role::Coordinator => ExtendedKeyUsagePurpose::ServerAuth,
        Role::Worker => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, days);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    let (pem, key_file) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    write_public(&pem, &cert.pem())?;
    write_private(&key_file, &key.serialize_pem())?;
    Ok(vec![pem, key_file])
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks that run a little behind the issuer's.
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(i64::from(days));
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Private keys are created 0600 (never world-readable, not even briefly).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
