//! The worker: joins the coordinator, obeys its directives, and runs each assignment on a
//! dedicated training thread that owns the model (the async runtime never blocks on a step).

#![warn(missing_docs)]

mod assignment;
mod client;
mod collective;
mod ctx;
mod feed;
mod finetune;
mod phase;
mod pretrain;
mod progress;
mod recent;
mod stage;
mod task_data;
mod upload;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

pub use client::{connect, Access, Client};

use crate::proto::{self, directive::Kind};

/// How `tandem worker` runs: the coordinator to join and this worker's resources.
pub struct WorkerOptions {
    /// e.g. `http://127.0.0.1:50051`
    pub coordinator: String,
    /// The job token and TLS material presented on every call (the token also keys the ring).
    pub access: Access,
    /// Free-form, stable id (pod name); defaults to host:pid.
    pub worker_id: String,
    /// Where the ring listener binds (`0.0.0.0:PORT` in a pod, `127.0.0.1:0` locally).
    pub ring_listen: SocketAddr,
    /// Host name or IP peers use to reach this worker's ring port (default: the bound IP).
    pub advertise_host: Option<String>,
    /// CPU threads for the kernels.
    pub threads: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// How long to keep trying to reach the coordinator.
    pub connect_timeout: Duration,
}

/// Runs until the coordinator says stop, the coordinator stays unreachable for
/// `connect_timeout`, or `shutdown`. A lost coordinator (restarted, or a network cut) is
/// rejoined with backoff; a new assignment replaces the current one.
pub async fn run(opts: WorkerOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Checked before joining, so a worker that cannot use its device never takes a rank.
    let device = crate::util::parse_device(&opts.device)?;
    if !device.is_cpu() {
        tracing::info!(device = %opts.device, "training on the GPU (model and gradients there; all-reduce and AdamW on the host)");
    }
    let listener = crate::comm::ring::RingListener::bind(opts.ring_listen)
        .with_context(|| format!("binding the ring listener on {}", opts.ring_listen))?;
    let bound = listener.local_addr()?;
    let ring_addr = match &opts.advertise_host {
        Some(h) => format!("{h}:{}", bound.port()),
        None => bound.to_string(),
    };
    let mut training = Training::new(listener, device, opts.access.token.clone());
    let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
    tokio::pin!(shutdown);
    let mut first = true;
    let result = loop {
        // Once assigned, the worker knows its job and presents it on every rejoin: a
        // coordinator that comes back on this address running another job refuses it.
        let job_id = training.progress.lock().unwrap().job_id.clone();
        let (client, directives) = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            r = join(&opts, &ring_addr, &job_id) => match r {
                Ok(x) => x,
                Err(e) if first => break Err(e),
                Err(e) => break Err(e.context("the coordinator did not come back")),
            },
        };
        first = false;
        tracing::info!(coordinator = %opts.coordinator, %ring_addr, "joined; waiting for an assignment");
        if let Some(h) = heartbeat.replace(tokio::spawn(heartbeat_loop(
            client.clone(),
            training.progress.clone(),
        ))) {
            h.abort();
        }
        tokio::select! {
            _ = &mut shutdown => {
                training.stop();
                break Ok(());
            }
            end = training.session(client, directives, opts.connect_timeout) => match end {
                Some(end) => break end,
                None => continue, // rejoin
            }
        }
    };
    if let Some(h) = heartbeat {
        h.abort();
    }
    training.join().await;
    result
}

/// Joins the job, retrying until `connect_timeout`: a coordinator that is starting
/// (listening, but not yet serving) or restarting answers Unavailable for a while; a refusal
/// (wrong token, protocol version, ended job) is final.
async fn join(
    opts: &WorkerOptions,
    ring_addr: &str,
    job_id: &str,
) -> anyhow::Result<(Client, tonic::Streaming<proto::Directive>)> {
    let start = std::time::Instant::now();
    let mut wait = Duration::from_millis(200);
    loop {
        let left = opts.connect_timeout.saturating_sub(start.elapsed());
        let mut client = connect(&opts.coordinator, &opts.access, left).await?;
        let r = client
            .join(proto::JoinRequest {
                protocol_version: proto::PROTOCOL_VERSION,
                job_id: job_id.into(),
                worker_id: opts.worker_id.clone(),
                ring_addr: ring_addr.into(),
                threads: opts.threads as u32,
                device: opts.device.clone(),
            })
            .await;
        match r {
            Ok(stream) => return Ok((client, stream.into_inner())),
            Err(st)
                if matches!(
                    st.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                        | tonic::Code::DeadlineExceeded
                ) && start.elapsed() + wait < opts.connect_timeout =>
            {
                tracing::debug!("join not possible yet ({st}); retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(st) => {
                let hint = join_hint(&st, &opts.access.security);
                return Err(anyhow::Error::new(st).context(format!("joining the job{hint}")));
            }
        }
    }
}

/// What a failed join's transport error means for the operator: a plaintext client at a TLS
/// port gets an HTTP/2 protocol error, and a certificate from another CA a TLS alert.
fn join_hint(st: &tonic::Status, security: &crate::tls::Security) -> &'static str {
    let text = format!("{st:?}");
    let protocol = text.contains("h2 protocol error") || text.contains("frame with invalid size");
    if protocol && *security == crate::tls::Security::Insecure {
        " (a protocol error in plaintext: does the coordinator use TLS? then give this worker \
         the job's certificates with --tls-dir and an https:// URL)"
    } else if ["UnknownCA", "BadCertificate", "CertificateRequired"]
        .iter()
        .any(|a| text.contains(a))
    {
        " (the coordinator refused this worker's certificate: --tls-dir must hold a worker \
         certificate signed by the job's CA, from `tandem certs init` or `tandem certs issue`)"
    } else {
        ""
    }
}

/// The training thread of the current assignment, and what the async side shares with it.
struct Training {
    listener: crate::comm::ring::RingListener,
    device: candle_core::Device,
    token: String,
    /// Set by an Abort/Stop directive: the loop stops between steps.
    abort: Arc<AtomicBool>,
    /// Unblocks a collective in progress.
    ring_abort: Arc<Mutex<Option<crate::comm::ring::AbortHandle>>>,
    /// The latest progress, sent by the heartbeat.
    progress: Arc<Mutex<proto::ProgressReport>>,
    thread: Option<std::thread::JoinHandle<()>>,
    done_tx: tokio::sync::mpsc::UnboundedSender<anyhow::Result<()>>,
    done_rx: tokio::sync::mpsc::UnboundedReceiver<anyhow::Result<()>>,
}

impl Training {
    fn new(
        listener: crate::comm::ring::RingListener,
        device: candle_core::Device,
        token: String,
    ) -> Self {
        let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
        Training {
            listener,
            device,
            token,
            abort: Arc::new(AtomicBool::new(false)),
            ring_abort: Arc::new(Mutex::new(None)),
            progress: Arc::new(Mutex::new(proto::ProgressReport::default())),
            thread: None,
            done_tx,
            done_rx,
        }
    }

    /// Asks the training thread to stop: between steps, or now inside a collective.
    fn stop(&self) {
        self.abort.store(true, Ordering::SeqCst);
        if let Some(h) = self.ring_abort.lock().unwrap().take() {
            h.abort();
        }
    }

    /// Waits for the training thread, if any (after [`Self::stop`] it returns promptly).
    async fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// Replaces the current assignment by `a`: stops and waits for the running one, then
    /// starts `a` on a new training thread.
    async fn assign(&mut self, a: proto::Assignment, client: &Client) -> anyhow::Result<()> {
        if self.thread.is_some() {
            self.stop();
            self.join().await;
        }
        self.abort.store(false, Ordering::SeqCst);
        let ctx = ctx::Ctx {
            rt: tokio::runtime::Handle::current(),
            client: client.clone(),
            listener: self.listener.try_clone()?,
            token: self.token.clone(),
            abort: self.abort.clone(),
            ring_abort: self.ring_abort.clone(),
            progress: self.progress.clone(),
            device: self.device.clone(),
        };
        let tx = self.done_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("train-r{}", a.rank))
            .spawn(move || {
                let r = assignment::run_assignment(a, ctx);
                let _ = tx.send(r);
            })?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Obeys the coordinator's directives until the session ends: Some(the worker's end) on a
    /// Stop of a finished or failed job, None to rejoin (a paused job, a lost coordinator).
    async fn session(
        &mut self,
        mut client: Client,
        mut directives: tonic::Streaming<proto::Directive>,
        connect_timeout: Duration,
    ) -> Option<anyhow::Result<()>> {
        loop {
            tokio::select! {
                res = self.done_rx.recv() => {
                    if let Some(Err(e)) = res {
                        self.report_failure(&mut client, e).await;
                    }
                }
                d = directives.message() => {
                    let kind = match d {
                        Ok(Some(proto::Directive { kind })) => kind,
                        Ok(None) | Err(_) => {
                            let why = match d {
                                Err(status) => status.to_string(),
                                _ => "the directive stream ended".into(),
                            };
                            tracing::warn!("lost the coordinator ({why}); stopping training and rejoining");
                            self.stop();
                            return None;
                        }
                    };
                    match kind {
                        Some(Kind::Assignment(a)) => {
                            tracing::info!(rank = a.rank, world = a.world_size, generation = a.generation, stage = a.stage_index, "assignment received");
                            if let Err(e) = self.assign(a, &client).await {
                                return Some(Err(e));
                            }
                        }
                        Some(Kind::Abort(a)) => {
                            tracing::warn!(generation = a.generation, "abort: {}", a.reason);
                            self.stop();
                        }
                        Some(Kind::Stop(s)) => {
                            self.stop();
                            return after_stop(&s, connect_timeout);
                        }
                        None => {}
                    }
                }
            }
        }
    }

    /// Tells the coordinator why training failed (unless the failure is an abort's).
    async fn report_failure(&self, client: &mut Client, e: anyhow::Error) {
        if self.abort.load(Ordering::SeqCst) {
            return;
        }
        tracing::error!("training failed: {e:#}");
        let mut p = self.progress.lock().unwrap().clone();
        p.error = format!("{e:#}");
        let _ = client.report_progress(p).await;
    }
}

/// What a Stop means for this worker: the end of its run (Ok for a finished job, the reason
/// for a failed one), or None for a paused job, which it rejoins when the coordinator resumes.
fn after_stop(s: &proto::Stop, connect_timeout: Duration) -> Option<anyhow::Result<()>> {
    match s.kind() {
        proto::StopKind::Paused => {
            tracing::info!(
                "the coordinator paused the job ({}); rejoining when it resumes (within --connect-timeout-s {} s)",
                s.reason,
                connect_timeout.as_secs()
            );
            None
        }
        proto::StopKind::Finished => {
            tracing::info!("stop: {} (job finished)", s.reason);
            Some(Ok(()))
        }
        proto::StopKind::Failed => Some(Err(anyhow::anyhow!("the job failed: {}", s.reason))),
    }
}

/// Sends the current progress report (nothing before the first assignment or after the
/// stage's final report). The logged steps it carried are then in metrics.jsonl and leave the
/// queue (by step number: the heartbeat and the training thread may both be sending), unless
/// a new stage or generation replaced the report meanwhile.
pub(crate) async fn send_progress(
    client: &mut Client,
    progress: &Mutex<proto::ProgressReport>,
) -> Result<(), tonic::Status> {
    let p = progress.lock().unwrap().clone();
    if p.job_id.is_empty() || p.done {
        return Ok(());
    }
    let last_sent = p.steps.last().map(|r| r.step);
    let sent = (p.generation, p.stage_index);
    client.report_progress(p).await?;
    let mut p = progress.lock().unwrap();
    if let Some(last) = last_sent {
        if (p.generation, p.stage_index) == sent {
            p.steps.retain(|r| r.step > last);
        }
    }
    Ok(())
}

/// Sends the latest progress every second: the coordinator's liveness signal, decoupled from
/// step time, so the training thread never waits on an RPC for progress.
async fn heartbeat_loop(mut client: Client, progress: Arc<Mutex<proto::ProgressReport>>) {
    // TANDEM_HEARTBEAT_S changes the interval (used to measure the coordinator's overhead).
    let every = std::env::var("TANDEM_HEARTBEAT_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(1.0);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(every));
    loop {
        tick.tick().await;
        if let Err(e) = send_progress(&mut client, &progress).await {
            tracing::debug!("progress report refused: {e}");
        }
    }
}
