//! `tandem launch`: one coordinator and N workers as child processes on 127.0.0.1, with a
//! progress bar, rank-prefixed logs, a human summary and the job's exit code. Every child
//! dies with the launcher (interrupt or coordinator failure).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::config::JobConfig;
use crate::coordinator::Summary;
use crate::proto;

pub struct LaunchOptions {
    pub config: PathBuf,
    pub workers: Option<usize>,
    pub corpus: Vec<String>,
    pub max_steps: Option<u64>,
    pub state_dir: Option<PathBuf>,
    pub sets: Vec<String>,
    /// CPU threads per worker.
    pub threads: usize,
    /// Every worker's `--device`, or a comma-separated list (see [`crate::util::worker_devices`]).
    pub device: String,
    /// Plain log lines instead of a progress bar (also when stderr is not a terminal).
    pub no_progress: bool,
    /// Forward no child output and print no summary (for benchmarks).
    pub quiet: bool,
    /// Continue the job in the config's state_dir.
    pub resume: bool,
}

impl LaunchOptions {
    /// A run of `config` with the flags `launch` and `finetune` share.
    pub fn new(config: PathBuf, run: crate::cli::RunArgs) -> Self {
        LaunchOptions {
            config,
            workers: run.workers,
            corpus: vec![],
            max_steps: run.max_steps,
            state_dir: run.state_dir,
            sets: run.sets,
            threads: run.threads,
            device: run.device,
            no_progress: run.no_progress,
            quiet: false,
            resume: false,
        }
    }
}

/// A fresh run refuses a state dir that already holds a job, and says what to do instead.
pub fn refuse_existing_job(state_dir: &Path) -> anyhow::Result<()> {
    if let Some(r) = crate::coordinator::JobRecord::load(state_dir)? {
        anyhow::bail!(
            "{} already holds job {:?} ({}). To continue it (or see its summary): tandem launch --resume {}; \
             for a fresh run: --state-dir NEW_DIR, or remove {}",
            state_dir.display(),
            r.job,
            r.status,
            state_dir.display(),
            state_dir.display()
        );
    }
    Ok(())
}

/// Applies the launch flags to the loaded configuration.
pub fn effective_config(opts: &LaunchOptions) -> anyhow::Result<JobConfig> {
    let mut cfg = JobConfig::load(&opts.config, &opts.sets)?;
    if let Some(n) = opts.workers {
        anyhow::ensure!(n >= 1, "--workers must be at least 1");
        cfg.cluster.min_workers = n;
        cfg.cluster.max_workers = n;
    }
    if !opts.corpus.is_empty() {
        // A corpus of one's own gets a vocabulary trained on it, unless data.tokenizer names
        // one: a tokenizer the user chose is never replaced silently.
        cfg.data.corpus = opts.corpus.clone();
    }
    if let Some(m) = opts.max_steps {
        for s in &mut cfg.stages {
            s.max_steps = Some(m);
        }
    }
    if let Some(d) = &opts.state_dir {
        cfg.job.state_dir = d.clone();
    }
    // The flags are relative to the working directory; the job.toml written from this config
    // is read from the state dir.
    cfg.make_paths_absolute();
    cfg.validate()?;
    Ok(cfg)
}

fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn spawn(exe: &Path, args: &[String], token: &str, threads: usize) -> anyhow::Result<Child> {
    Command::new(exe)
        .args(args)
        .env("TANDEM_TOKEN", token)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))
}

/// Forwards a child's output line by line with a prefix. A worker's prefix switches from its
/// launch index to its rank once it logs its assignment ("assignment received rank=N").
fn forward_output(child: &mut Child, prefix: String, tx: mpsc::UnboundedSender<String>) {
    let prefix = std::sync::Arc::new(std::sync::Mutex::new(prefix));
    let streams: Vec<Box<dyn tokio::io::AsyncRead + Unpin + Send>> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    for s in streams {
        let (tx, prefix) = (tx.clone(), prefix.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(s).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if l.contains("assignment received") {
                    if let Some(rank) = l
                        .split("rank=")
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                    {
                        *prefix.lock().unwrap() = format!("[rank {rank}]");
                    }
                }
                let p = prefix.lock().unwrap().clone();
                let _ = tx.send(format!("{p} {l}"));
            }
        });
    }
}

/// Runs the job; returns the process exit code (0 when the job completed).
pub async fn run(
    opts: LaunchOptions,
    interrupt: impl std::future::Future<Output = ()>,
) -> anyhow::Result<i32> {
    // A device the workers cannot use fails here, not after every worker's restarts.
    let devices = crate::util::worker_devices(&opts.device)?;
    let mut cfg = effective_config(&opts)?;
    cfg.check_paths()?;
    if let Some(gpu) = crate::util::shared_gpu(&devices, cfg.cluster.max_workers) {
        if cfg.cluster.gpu_collective == crate::config::GpuCollective::Nccl {
            // NCCL refuses two ranks on one GPU: their gradients meet in the ring instead.
            cfg.cluster.gpu_collective = crate::config::GpuCollective::Ring;
            if !opts.quiet {
                eprintln!(
                    "tandem launch: workers share {gpu}; NCCL needs a GPU per worker, so \
                     gradients go through the ring (cluster.gpu_collective = \"ring\")"
                );
            }
        }
    }
    let state_dir = cfg.job.state_dir.clone();
    if !opts.resume {
        refuse_existing_job(&state_dir)?;
    }
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let job_file = state_dir.join("job.toml");
    if !opts.resume {
        crate::util::write_atomic(&job_file, toml::to_string(&cfg)?.as_bytes())?;
    }
    let addr_file = state_dir.join("coordinator.addr");
    let _ = std::fs::remove_file(&addr_file);
    if !opts.resume {
        let _ = std::fs::remove_file(state_dir.join("summary.json"));
    }
    let exe = std::env::current_exe().context("locating the tandem binary")?;
    let token = random_token();
    let n = cfg.cluster.max_workers;
    let (log_tx, mut log_rx) = mpsc::unbounded_channel::<String>();

    let mut coord_args: Vec<String> = vec![
        "coordinator".into(),
        "--config".into(),
        job_file.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--addr-file".into(),
        addr_file.display().to_string(),
        "--no-summary".into(),
    ];
    if opts.resume {
        coord_args.push("--resume".into());
    }
    let mut coord = spawn(&exe, &coord_args, &token, 1)?;
    forward_output(&mut coord, "[coordinator]".into(), log_tx.clone());
    if !opts.quiet {
        eprintln!(
            "tandem launch: job {:?}, {n} worker(s) × {} thread(s), state in {}",
            cfg.job.name,
            opts.threads,
            state_dir.display()
        );
    }

    let bar = if opts.quiet
        || opts.no_progress
        || !std::io::IsTerminal::is_terminal(&std::io::stderr())
    {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps · ETA {eta} · {msg}",
            )
            .expect("template"),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    };
    let println = |bar: &ProgressBar, s: &str| {
        if bar.is_hidden() {
            eprintln!("{s}");
        } else {
            bar.println(s);
        }
    };

    tokio::pin!(interrupt);
    let mut workers: Vec<Child> = vec![];
    let mut worker_args: Vec<Vec<String>> = vec![];
    let mut restarted = 0u32;
    let mut client = None;
    let started = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let status = loop {
        tokio::select! {
            _ = &mut interrupt => {
                println(&bar, "tandem launch: interrupted; stopping every process");
                bar.finish_and_clear();
                return Ok(130);
            }
            Some(line) = log_rx.recv() => if !opts.quiet { println(&bar, &line) },
            st = coord.wait() => break st?,
            _ = poll.tick() => {
                if workers.is_empty() {
                    if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                        let url = format!("http://{}", addr.trim());
                        for i in 0..n {
                            let args: Vec<String> = vec![
                                "worker".into(), "--coordinator".into(), url.clone(),
                                "--threads".into(), opts.threads.to_string(),
                                "--device".into(), devices[i % devices.len()].clone(),
                                "--worker-id".into(), format!("local-{i}"),
                            ];
                            let mut w = spawn(&exe, &args, &token, opts.threads)?;
                            forward_output(&mut w, format!("[worker {i}]"), log_tx.clone());
                            workers.push(w);
                            worker_args.push(args);
                        }
                        client = Some(crate::worker::connect(&url, &token, Duration::from_secs(10)).await?);
                    } else if started.elapsed() > Duration::from_secs(600) {
                        anyhow::bail!("the coordinator did not start listening within 10 minutes");
                    }
                } else if let Some(c) = client.as_mut() {
                    // The local elastic agent: a worker process that dies is started again
                    // (it rejoins; the coordinator restarts the generation from the last
                    // checkpoint), up to cluster.max_restarts times.
                    for i in 0..workers.len() {
                        if let Ok(Some(st)) = workers[i].try_wait() {
                            if st.success() || restarted >= cfg.cluster.max_restarts {
                                continue;
                            }
                            restarted += 1;
                            println(&bar, &format!(
                                "[launch] worker {i} exited ({st}); starting it again ({restarted}/{})",
                                cfg.cluster.max_restarts
                            ));
                            let mut w = spawn(&exe, &worker_args[i], &token, opts.threads)?;
                            forward_output(&mut w, format!("[worker {i}]"), log_tx.clone());
                            workers[i] = w;
                        }
                    }
                    if let Ok(s) = c.status(proto::StatusRequest {}).await {
                        let s = s.into_inner();
                        if s.total_steps > 0 {
                            bar.set_length(s.total_steps);
                            bar.set_position(s.step.min(s.total_steps));
                        }
                        bar.set_message(format!(
                            "{} · {} · epoch {}/{} · loss {:.3} · MLM acc {:.3} · NSP acc {:.3} · {:.1} samples/s",
                            s.phase, s.stage_name, (s.epoch + 1).min(s.epochs.max(1)), s.epochs, s.loss, s.mlm_accuracy, s.nsp_accuracy, s.samples_per_s
                        ));
                    }
                }
            }
        }
    };
    // Drain what the processes still print, give workers a moment to leave, then stop them.
    let deadline = Instant::now() + Duration::from_secs(10);
    for w in &mut workers {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, w.wait()).await.is_err() {
            let _ = w.start_kill();
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    while let Ok(line) = log_rx.try_recv() {
        if !opts.quiet {
            println(&bar, &line);
        }
    }
    bar.finish_and_clear();
    let code = status.code().unwrap_or(1);
    if opts.quiet {
        return Ok(code);
    }
    match std::fs::read(state_dir.join("summary.json")) {
        Ok(b) => {
            let s: Summary = serde_json::from_slice(&b)?;
            eprintln!("{}", crate::coordinator::human_summary(&s, &state_dir));
        }
        Err(_) => eprintln!(
            "tandem launch: the coordinator exited with status {code} and wrote no summary"
        ),
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_flag_keeps_a_configured_tokenizer() {
        let dir = std::env::temp_dir().join(format!("tandem-launch-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("job.toml");
        let text = "[job]\nname = \"t\"\nstate_dir = \"s\"\n[model]\npreset = \"tiny\"\n[data]\ncorpus = [\"a.txt\"]\n[[stages]]\nname = \"p\"\nkind = \"pretrain\"\nlr = 1e-3\n";
        std::fs::write(&cfg, text).unwrap();
        let opts = |sets: Vec<String>| LaunchOptions {
            config: cfg.clone(),
            workers: None,
            corpus: vec!["mine.txt".into()],
            max_steps: None,
            state_dir: None,
            sets,
            threads: 1,
            device: "cpu".into(),
            no_progress: true,
            quiet: true,
            resume: false,
        };
        let c = effective_config(&opts(vec!["data.tokenizer=tok".into()])).unwrap();
        // Flags are relative to the working directory, and made absolute for job.toml.
        let abs = |p: &str| std::path::absolute(p).unwrap();
        assert_eq!(c.data.corpus, [abs("mine.txt").display().to_string()]);
        assert_eq!(c.data.tokenizer, Some(abs("tok")));
        let c = effective_config(&opts(vec![])).unwrap();
        assert_eq!(c.data.tokenizer, None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
