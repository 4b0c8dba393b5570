//! The worker: joins the coordinator, obeys its directives, and runs each assignment on a
//! dedicated training thread that owns the model (the async runtime never blocks on a step).

mod client;
mod feed;
mod finetune;
mod recent;
mod train;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

pub use client::{connect, Client};

use crate::proto::{self, directive::Kind};

pub struct WorkerOptions {
    /// e.g. `http://127.0.0.1:50051`
    pub coordinator: String,
    pub token: String,
    /// Free-form, stable id (pod name); defaults to host:pid.
    pub worker_id: String,
    /// Where the ring listener binds (`0.0.0.0:PORT` in a pod, `127.0.0.1:0` locally).
    pub ring_listen: SocketAddr,
    /// Host name or IP peers use to reach this worker's ring port (default: the bound IP).
    pub advertise_host: Option<String>,
    pub threads: usize,
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
    let abort = Arc::new(AtomicBool::new(false));
    let ring_abort: Arc<Mutex<Option<crate::comm::ring::AbortHandle>>> = Arc::new(Mutex::new(None));
    let progress = Arc::new(Mutex::new(proto::ProgressReport::default()));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<anyhow::Result<()>>();
    let mut training: Option<std::thread::JoinHandle<()>> = None;
    let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
    tokio::pin!(shutdown);

    let stop_training =
        |abort: &AtomicBool, ring_abort: &Mutex<Option<crate::comm::ring::AbortHandle>>| {
            abort.store(true, Ordering::SeqCst);
            if let Some(h) = ring_abort.lock().unwrap().take() {
                h.abort();
            }
        };
    let mut first = true;
    let result = 'session: loop {
        // (Re)join. The first attempt waits up to connect_timeout for the coordinator to
        // come up; later ones too (a restarted coordinator on the same address).
        // (Re)join until connect_timeout: a coordinator that is starting (listening, but not yet
        // serving) or restarting answers Unavailable for a while; a refusal (wrong token,
        // protocol version, ended job) is final.
        let joined = async {
            let start = std::time::Instant::now();
            let mut wait = Duration::from_millis(200);
            loop {
                let left = opts.connect_timeout.saturating_sub(start.elapsed());
                let mut client = connect(&opts.coordinator, &opts.token, left).await?;
                let r = client
                    .join(proto::JoinRequest {
                        protocol_version: proto::PROTOCOL_VERSION,
                        job_id: String::new(),
                        worker_id: opts.worker_id.clone(),
                        ring_addr: ring_addr.clone(),
                        threads: opts.threads as u32,
                        device: opts.device.clone(),
                    })
                    .await;
                match r {
                    Ok(stream) => return anyhow::Ok((client, stream.into_inner())),
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
                    Err(st) => return Err(anyhow::Error::new(st).context("joining the job")),
                }
            }
        };
        let (mut client, mut directives) = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            r = joined => match r {
                Ok(x) => x,
                Err(e) if first => break Err(e),
                Err(e) => break Err(e.context("the coordinator did not come back")),
            },
        };
        first = false;
        tracing::info!(coordinator = %opts.coordinator, %ring_addr, "joined; waiting for an assignment");
        if let Some(h) = heartbeat.take() {
            h.abort();
        }
        heartbeat = Some(tokio::spawn(heartbeat_loop(
            client.clone(),
            progress.clone(),
        )));
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    stop_training(&abort, &ring_abort);
                    break 'session Ok(());
                }
                res = done_rx.recv() => {
                    if let Some(Err(e)) = res {
                        if !abort.load(Ordering::SeqCst) {
                            tracing::error!("training failed: {e:#}");
                            let mut p = progress.lock().unwrap().clone();
                            p.error = format!("{e:#}");
                            let _ = client.report_progress(p).await;
                        }
                    }
                }
                d = directives.message() => match d {
                    Ok(Some(proto::Directive { kind: Some(Kind::Assignment(a)) })) => {
                        tracing::info!(rank = a.rank, world = a.world_size, generation = a.generation, stage = a.stage_index, "assignment received");
                        // A new assignment replaces the current one: stop it and wait for it.
                        if let Some(t) = training.take() {
                            stop_training(&abort, &ring_abort);
                            let _ = tokio::task::spawn_blocking(move || t.join()).await;
                        }
                        abort.store(false, Ordering::SeqCst);
                        let ctx = train::Ctx {
                            rt: tokio::runtime::Handle::current(),
                            client: client.clone(),
                            listener: listener.try_clone()?,
                            token: opts.token.clone(),
                            abort: abort.clone(),
                            ring_abort: ring_abort.clone(),
                            progress: progress.clone(),
                            device: device.clone(),
                        };
                        let tx = done_tx.clone();
                        training = Some(std::thread::Builder::new().name(format!("train-r{}", a.rank)).spawn(move || {
                            let r = train::run_assignment(a, ctx);
                            let _ = tx.send(r);
                        })?);
                    }
                    Ok(Some(proto::Directive { kind: Some(Kind::Abort(a)) })) => {
                        tracing::warn!(generation = a.generation, "abort: {}", a.reason);
                        stop_training(&abort, &ring_abort);
                    }
                    Ok(Some(proto::Directive { kind: Some(Kind::Stop(s)) })) => {
                        stop_training(&abort, &ring_abort);
                        match after_stop(&s, opts.connect_timeout) {
                            Some(end) => break 'session end,
                            None => continue 'session,
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        let why = match d {
                            Err(status) => status.to_string(),
                            _ => "the directive stream ended".into(),
                        };
                        tracing::warn!("lost the coordinator ({why}); stopping training and rejoining");
                        stop_training(&abort, &ring_abort);
                        continue 'session;
                    }
                }
            }
        }
    };
    if let Some(h) = heartbeat {
        h.abort();
    }
    if let Some(t) = training {
        // The abort flag and the ring's abort make the thread return promptly.
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    result
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
