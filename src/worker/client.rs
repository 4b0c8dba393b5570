//! The worker's side of the control plane: connecting with backoff and the blocking RPC
//! helpers the training thread uses (through a runtime handle).

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::proto::{self, coordinator_client::CoordinatorClient};
use crate::tls::Security;
use crate::train::checkpoint::sha256_hex;

/// A connected coordinator client that sends the job token on every call.
pub type Client = CoordinatorClient<InterceptedService<Channel, TokenInterceptor>>;

/// Adds the job token (`x-tandem-token`) to every request.
#[derive(Clone)]
pub struct TokenInterceptor(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert(proto::TOKEN_HEADER, self.0.clone());
        Ok(req)
    }
}

/// How a client reaches the coordinator: the job token it presents and the TLS it speaks.
#[derive(Debug, Clone)]
pub struct Access {
    /// The job token, sent on every call (inside TLS unless `--insecure`).
    pub token: String,
    /// Mutual TLS with the job's certificates, or plaintext.
    pub security: Security,
    /// The name the coordinator's certificate must carry (default: the URL's host).
    pub server_name: Option<String>,
}

/// Connects to the coordinator, retrying with exponential backoff until `deadline`.
pub async fn connect(url: &str, access: &Access, deadline: Duration) -> anyhow::Result<Client> {
    check_url(url, &access.security)?;
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| {
            format!("invalid coordinator URL {url:?} (expected e.g. https://127.0.0.1:50051)")
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // HTTP/2's default 64 KiB flow-control window stalls shard and checkpoint streams.
        .initial_stream_window_size(proto::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(proto::STREAM_WINDOW_BYTES * 2)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    if let Some(tls) = access
        .security
        .client_config(access.server_name.as_deref())?
    {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("TLS set-up for {url}: {}", root_cause(&e)))?;
    }
    let token = access
        .token
        .parse()
        .map_err(|_| anyhow::anyhow!("the job token must be printable ASCII"))?;
    let start = Instant::now();
    let mut wait = Duration::from_millis(500);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match endpoint.connect().await {
            Ok(ch) => {
                if attempt > 1 {
                    tracing::info!("reached the coordinator at {url} (attempt {attempt})");
                }
                return Ok(
                    CoordinatorClient::with_interceptor(ch, TokenInterceptor(token))
                        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES),
                );
            }
            Err(e) if start.elapsed() < deadline => {
                let left = deadline.saturating_sub(start.elapsed());
                tracing::warn!(
                    "coordinator {url} not reachable: {}; retrying in {:.1} s (attempt {attempt}, \
                     giving up in {} s)",
                    root_cause(&e),
                    wait.as_secs_f64(),
                    left.as_secs()
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => anyhow::bail!(
                "cannot reach the coordinator at {url} within {} s ({attempt} attempts): {}",
                deadline.as_secs(),
                root_cause(&e)
            ),
        }
    }
}

/// A coordinator URL is `https://HOST:PORT` (`http://` with `--insecure`); tonic's own error
/// for anything else is an opaque "transport error" after the whole connect timeout.
fn check_url(url: &str, security: &Security) -> anyhow::Result<()> {
    let want = security.scheme();
    let bad = |why: &str| {
        anyhow::anyhow!(
            "invalid coordinator URL {url:?}: {why} (expected e.g. {want}://127.0.0.1:50051)"
        )
    };
    let uri: tonic::transport::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    match uri.scheme_str() {
        Some(s) if s == want => {}
        Some("http") => {
            return Err(bad(
                "plaintext http:// with TLS certificates given: use https:// (or --insecure \
                 for a plaintext control plane)",
            ))
        }
        Some("https") => {
            return Err(bad(
                "https:// with --insecure: use http://, or drop --insecure and pass --tls-dir",
            ))
        }
        Some(s) => return Err(bad(&format!("scheme {s:?}"))),
        None => return Err(bad("no scheme")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if uri.port_u16().is_none() {
        tracing::warn!("coordinator URL {url} names no port: using 80 (the coordinator listens on 50051 by default)");
    }
    Ok(())
}

/// The innermost cause of a transport error ("Connection refused (os error 111)"): tonic's
/// own message is only "transport error".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Downloads one shard and checks its SHA-256.
pub async fn fetch_shard(
    client: &mut Client,
    job_id: &str,
    generation: u64,
    shard_id: u32,
) -> anyhow::Result<Vec<u8>> {
    let s = client
        .fetch_shard(proto::FetchShardRequest {
            job_id: job_id.into(),
            generation,
            shard_id,
        })
        .await
        .with_context(|| format!("fetching shard {shard_id}"))?
        .into_inner();
    collect_chunks(s, &format!("shard {shard_id}")).await
}

/// Downloads a fine-tuning stage's `role` file (train or dev) and checks its SHA-256.
pub async fn fetch_stage_file(
    client: &mut Client,
    job_id: &str,
    generation: u64,
    stage_index: u32,
    role: &str,
) -> anyhow::Result<Vec<u8>> {
    let s = client
        .fetch_stage_file(proto::FetchStageFileRequest {
            job_id: job_id.into(),
            generation,
            stage_index,
            role: role.into(),
        })
        .await
        .with_context(|| format!("fetching the {role} file of stage {stage_index}"))?
        .into_inner();
    collect_chunks(s, &format!("the {role} file of stage {stage_index}")).await
}

/// Gathers a chunked byte stream and checks the SHA-256 its last chunk carries.
async fn collect_chunks(
    mut s: tonic::Streaming<proto::ShardChunk>,
    what: &str,
) -> anyhow::Result<Vec<u8>> {
    let mut bytes = vec![];
    let mut sha = None;
    while let Some(c) = s.next().await {
        let c = c.with_context(|| format!("fetching {what}"))?;
        bytes.extend_from_slice(&c.data);
        if c.last {
            sha = Some(c.sha256);
        }
    }
    let sha = sha.with_context(|| format!("{what}: the stream ended early"))?;
    anyhow::ensure!(
        sha256_hex(&bytes) == sha,
        "{what} arrived corrupted (SHA-256 mismatch)"
    );
    Ok(bytes)
}

/// Where an upload goes and who sends it.
pub struct Upload<'a> {
    /// The job.
    pub job_id: &'a str,
    /// The generation it belongs to.
    pub generation: u64,
    /// The uploading member's secret (rank 0's, from its assignment).
    pub member_secret: &'a str,
    /// The checkpoint's name.
    pub name: &'a str,
}

/// Uploads checkpoint files under `to.name`.
pub async fn put_checkpoint(
    client: &mut Client,
    to: &Upload<'_>,
    files: Vec<(String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let name = to.name;
    let secret = to.member_secret.to_string();
    let chunks = crate::coordinator::checkpoint_chunks(to.job_id, to.generation, name, files)
        .enumerate()
        .map(move |(i, mut c)| {
            if i == 0 {
                c.member_secret = secret.clone();
            }
            (i, c)
        });
    // Test hook: TANDEM_TEST_UPLOAD_PAUSE_MS holds this process's first upload after its
    // first chunk, so a test can fail a generation while a checkpoint is still arriving.
    static PAUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let pause = std::env::var("TANDEM_TEST_UPLOAD_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|_| !PAUSED.swap(true, std::sync::atomic::Ordering::SeqCst))
        .map(Duration::from_millis);
    let stream = tokio_stream::iter(chunks).then(move |(i, c)| async move {
        if let (1, Some(p)) = (i, pause) {
            tokio::time::sleep(p).await;
        }
        c
    });
    client
        .put_checkpoint(stream)
        .await
        .with_context(|| format!("uploading checkpoint {name}"))?;
    Ok(())
}

/// Downloads a stored checkpoint's files (each verified against its SHA-256).
pub async fn get_checkpoint(
    client: &mut Client,
    job_id: &str,
    generation: u64,
    name: &str,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut s = client
        .get_checkpoint(proto::GetCheckpointRequest {
            job_id: job_id.into(),
            generation,
            name: name.into(),
        })
        .await
        .with_context(|| format!("downloading checkpoint {name}"))?
        .into_inner();
    let mut files: Vec<(String, Vec<u8>)> = vec![];
    let mut current: Option<(String, Vec<u8>)> = None;
    while let Some(c) = s.next().await {
        let c = c.with_context(|| format!("downloading checkpoint {name}"))?;
        let cur = current.get_or_insert_with(|| (c.file.clone(), vec![]));
        anyhow::ensure!(
            cur.0 == c.file,
            "checkpoint {name}: interleaved files in the stream"
        );
        cur.1.extend_from_slice(&c.data);
        if c.last_of_file {
            let (f, b) = current.take().expect("set above");
            anyhow::ensure!(
                sha256_hex(&b) == c.sha256,
                "checkpoint {name}: file {f} arrived corrupted"
            );
            files.push((f, b));
        }
    }
    anyhow::ensure!(
        current.is_none() && !files.is_empty(),
        "checkpoint {name}: the stream ended early"
    );
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_urls_are_checked_before_any_attempt() {
        let plain = Security::Insecure;
        let tls = Security::Mutual(crate::tls::TlsFiles {
            ca: "ca.pem".into(),
            cert: "worker.pem".into(),
            key: "worker.key".into(),
        });
        check_url("http://127.0.0.1:50051", &plain).unwrap();
        check_url("https://127.0.0.1:50051", &tls).unwrap();
        check_url("https://coordinator.default.svc:50051", &tls).unwrap();
        check_url("http://coordinator", &plain).unwrap(); // port 80, as HTTP means
        for (url, security, why) in [
            ("127.0.0.1:50051", &tls, "scheme"),
            ("localhost:50051", &plain, "scheme"),
            ("http://h:50051", &tls, "use https://"),
            ("https://h:50051", &plain, "with --insecure"),
            ("https://:50051", &tls, "host"),
            ("grpc://h:1", &tls, "scheme \"grpc\""),
        ] {
            let e = check_url(url, security).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(url), "{url}: {e}");
        }
    }
}
