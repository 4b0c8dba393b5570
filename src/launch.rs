//! `tandem launch`: one coordinator and N workers as child processes on 127.0.0.1, with a
//! progress bar, rank-prefixed logs, a human summary and the job's exit code. Every child
//! dies with the launcher (interrupt or coordinator failure).

#![warn(missing_docs)]

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
use crate::tls::{Role, Security, TlsFiles};

/// What `launch` and `finetune` share: how many workers, where the state goes, and how
/// each worker runs.
#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Number of worker processes (sets cluster.min_workers and max_workers).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Stop every stage after this many optimiser steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Where the job keeps its state (replaces job.state_dir).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Override any config key, e.g. --set stages[0].lr=5e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// CPU threads per worker.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Every worker's device: cpu, cuda or cuda:N (workers may share one GPU), or a
    /// comma-separated list that worker i takes entry i mod its length of
    /// (cuda:0,cuda:1,cuda:2,cuda:3: one GPU per worker).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print plain log lines instead of a progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Run the control plane in plaintext (by default `launch` makes the job's certificates
    /// in STATE_DIR/tls and every process uses mutual TLS).
    #[arg(long)]
    pub insecure: bool,
}

/// What `tandem launch` runs, and how.
pub struct LaunchOptions {
    /// The job's configuration file (TOML).
    pub config: PathBuf,
    /// Worker processes (sets cluster.min_workers and max_workers).
    pub workers: Option<usize>,
    /// Corpus files, directories or globs (replaces data.corpus when not empty).
    pub corpus: Vec<String>,
    /// Stop every stage after this many optimiser steps.
    pub max_steps: Option<u64>,
    /// Where the job keeps its state (replaces job.state_dir).
    pub state_dir: Option<PathBuf>,
    /// Config overrides, `KEY=VALUE` each (as `--set`).
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
    /// A plaintext control plane instead of mutual TLS.
    pub insecure: bool,
}

impl LaunchOptions {
    /// A run of `config` with the flags `launch` and `finetune` share.
    pub fn new(config: PathBuf, run: RunArgs) -> Self {
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
            insecure: run.insecure,
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

fn spawn(exe: &Path, args: &[String], token: &str, threads: usize) -> anyhow::Result<Child> {
    Command::new(exe)
        .args(args)
        .env("TANDEM_TOKEN", token)
        // Security comes from the arguments `launch` gives (its own certificates, or
        // --insecure), never from this shell's environment.
        .env_remove("TANDEM_TLS_DIR")
        .env_remove("TANDEM_INSECURE")
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))
}

/// A child's log prefix, shared with the tasks that forward its output.
type Prefix = std::sync::Arc<std::sync::Mutex<String>>;

/// Forwards a child's output line by line with `prefix` (a worker's switches from its launch
/// index to its rank once the coordinator's status shows it holds one).
fn forward_output(child: &mut Child, prefix: Prefix, tx: mpsc::UnboundedSender<String>) {
    type Stream = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
    let out = child.stdout.take().map(|s| Box::new(s) as Stream);
    let err = child.stderr.take().map(|s| Box::new(s) as Stream);
    for s in [out, err].into_iter().flatten() {
        let (tx, prefix) = (tx.clone(), prefix.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(s).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let p = prefix.lock().unwrap().clone();
                let _ = tx.send(format!("{p} {l}"));
            }
        });
    }
}

/// The local elastic agent's workers: started once the coordinator listens, each started
/// again when it dies (it rejoins; the coordinator restarts the generation from the last
/// checkpoint), up to `cluster.max_restarts` times in all.
struct Workers {
    exe: PathBuf,
    token: String,
    /// `--tls-dir DIR` or `--insecure`.
    security_args: Vec<String>,
    threads: usize,
    children: Vec<Child>,
    args: Vec<Vec<String>>,
    prefixes: Vec<Prefix>,
    restarted: u32,
    max_restarts: u32,
    log: mpsc::UnboundedSender<String>,
}

impl Workers {
    /// `local-{i}` for each of `n` workers, on `devices` in turn.
    fn start(&mut self, url: &str, n: usize, devices: &[String]) -> anyhow::Result<()> {
        for i in 0..n {
            let args: Vec<String> = vec![
                "worker".into(),
                "--coordinator".into(),
                url.into(),
                "--threads".into(),
                self.threads.to_string(),
                "--device".into(),
                devices[i % devices.len()].clone(),
                "--worker-id".into(),
                format!("local-{i}"),
            ]
            .into_iter()
            .chain(self.security_args.iter().cloned())
            .collect();
            let prefix: Prefix =
                std::sync::Arc::new(std::sync::Mutex::new(format!("[worker {i}]")));
            let mut w = spawn(&self.exe, &args, &self.token, self.threads)?;
            forward_output(&mut w, prefix.clone(), self.log.clone());
            self.children.push(w);
            self.args.push(args);
            self.prefixes.push(prefix);
        }
        Ok(())
    }

    /// Starts again each worker that failed, while restarts are left; says so through `say`.
    fn restart_failed(&mut self, say: impl Fn(&str)) -> anyhow::Result<()> {
        for i in 0..self.children.len() {
            let Ok(Some(st)) = self.children[i].try_wait() else {
                continue;
            };
            if st.success() || self.restarted >= self.max_restarts {
                continue;
            }
            self.restarted += 1;
            say(&format!(
                "[launch] worker {i} exited ({st}); starting it again ({}/{})",
                self.restarted, self.max_restarts
            ));
            *self.prefixes[i].lock().unwrap() = format!("[worker {i}]");
            let mut w = spawn(&self.exe, &self.args[i], &self.token, self.threads)?;
            forward_output(&mut w, self.prefixes[i].clone(), self.log.clone());
            self.children[i] = w;
        }
        Ok(())
    }

    /// Prefixes each worker's lines with the rank the coordinator gave it.
    fn name_ranks(&self, members: &[proto::MemberStatus]) {
        for m in members.iter().filter(|m| m.assigned) {
            let Some(i) = m.worker_id.strip_prefix("local-") else {
                continue;
            };
            if let Some(p) = i.parse::<usize>().ok().and_then(|i| self.prefixes.get(i)) {
                *p.lock().unwrap() = format!("[rank {}]", m.rank);
            }
        }
    }

    /// Gives the workers until `deadline` to leave, then stops them.
    async fn stop(&mut self, deadline: Instant) {
        for w in &mut self.children {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, w.wait()).await.is_err() {
                let _ = w.start_kill();
            }
        }
    }
}

/// The progress bar (hidden for quiet runs, --no-progress and a stderr that is no terminal).
fn progress_bar(opts: &LaunchOptions) -> ProgressBar {
    if opts.quiet || opts.no_progress || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(0);
    b.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps · ETA {eta} · {msg}",
        )
        .expect("template"),
    );
    b.enable_steady_tick(Duration::from_millis(200));
    b
}

/// A line above the bar (or on stderr when it is hidden).
fn say(bar: &ProgressBar, s: &str) {
    if bar.is_hidden() {
        eprintln!("{s}");
    } else {
        bar.println(s);
    }
}

/// The coordinator's status on the bar: steps of the stage, and what its kind measures.
fn show_status(bar: &ProgressBar, s: &proto::StatusResponse) {
    if s.total_steps > 0 {
        bar.set_length(s.total_steps);
        bar.set_position(s.step.min(s.total_steps));
    }
    let measures = if s.mlm_accuracy > 0.0 || s.nsp_accuracy > 0.0 {
        format!(
            "MLM acc {:.3} · NSP acc {:.3}",
            s.mlm_accuracy, s.nsp_accuracy
        )
    } else {
        format!("train acc {:.3}", s.train_accuracy)
    };
    bar.set_message(format!(
        "{} · {} · epoch {}/{} · loss {:.3} · {measures} · {:.1} samples/s",
        s.phase,
        s.stage_name,
        (s.epoch + 1).min(s.epochs.max(1)),
        s.epochs,
        s.loss,
        s.samples_per_s
    ));
}

/// The effective configuration, checked, with its state dir made ready: returns it and the
/// job file the coordinator reads.
fn prepare(opts: &LaunchOptions, devices: &[String]) -> anyhow::Result<(JobConfig, PathBuf)> {
    let mut cfg = effective_config(opts)?;
    cfg.check_paths()?;
    if let Some(gpu) = crate::util::shared_gpu(devices, cfg.cluster.max_workers) {
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
    let _ = std::fs::remove_file(state_dir.join("coordinator.addr"));
    if !opts.resume {
        crate::util::write_atomic(&job_file, toml::to_string(&cfg)?.as_bytes())?;
        let _ = std::fs::remove_file(state_dir.join("summary.json"));
    }
    Ok((cfg, job_file))
}

/// The control plane's security for a local job: the job's certificates in `state_dir/tls`
/// (made on first use, kept for `--resume`), or plaintext with `--insecure`. Returns it with
/// the arguments that give it to a child process.
fn local_security(state_dir: &Path, insecure: bool) -> anyhow::Result<(Security, Vec<String>)> {
    if insecure {
        return Ok((Security::Insecure, vec!["--insecure".into()]));
    }
    let dir = state_dir.join("tls");
    if !dir.join("ca.pem").exists() {
        crate::tls::certs::init(&crate::tls::certs::InitOptions {
            dir: dir.clone(),
            coordinator_names: vec![],
            days: 365,
            force: true,
        })?;
    }
    let files = TlsFiles::find(&dir, Role::Worker)?;
    Ok((
        Security::Mutual(files),
        vec!["--tls-dir".into(), dir.display().to_string()],
    ))
}

/// The coordinator's command line.
fn coordinator_args(job_file: &Path, addr_file: &Path, resume: bool) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "coordinator".into(),
        "--config".into(),
        job_file.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--addr-file".into(),
        addr_file.display().to_string(),
        "--no-summary".into(),
    ];
    if resume {
        a.push("--resume".into());
    }
    a
}

/// Runs the job; returns the process exit code (0 when the job completed).
pub async fn run(
    opts: LaunchOptions,
    interrupt: impl std::future::Future<Output = ()>,
) -> anyhow::Result<i32> {
    // A device the workers cannot use fails here, not after every worker's restarts.
    let devices = crate::util::worker_devices(&opts.device)?;
    let (cfg, job_file) = prepare(&opts, &devices)?;
    let state_dir = cfg.job.state_dir.clone();
    let addr_file = state_dir.join("coordinator.addr");
    let exe = std::env::current_exe().context("locating the tandem binary")?;
    let token = crate::util::random_hex(24);
    let n = cfg.cluster.max_workers;
    let (log_tx, mut log_rx) = mpsc::unbounded_channel::<String>();
    let (security, security_args) = local_security(&state_dir, opts.insecure)?;
    let mut coord_args = coordinator_args(&job_file, &addr_file, opts.resume);
    coord_args.extend(security_args.iter().cloned());
    let mut coord = spawn(&exe, &coord_args, &token, 1)?;
    let coord_prefix = std::sync::Arc::new(std::sync::Mutex::new("[coordinator]".into()));
    forward_output(&mut coord, coord_prefix, log_tx.clone());
    if !opts.quiet {
        eprintln!(
            "tandem launch: job {:?}, {n} worker(s) × {} thread(s), state in {}",
            cfg.job.name,
            opts.threads,
            state_dir.display()
        );
    }
    let bar = progress_bar(&opts);
    let mut workers = Workers {
        exe,
        token: token.clone(),
        security_args,
        threads: opts.threads,
        children: vec![],
        args: vec![],
        prefixes: vec![],
        restarted: 0,
        max_restarts: cfg.cluster.max_restarts,
        log: log_tx.clone(),
    };
    tokio::pin!(interrupt);
    let mut client = None;
    let started = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let status = loop {
        tokio::select! {
            _ = &mut interrupt => {
                say(&bar, "tandem launch: interrupted; stopping every process");
                bar.finish_and_clear();
                return Ok(130);
            }
            Some(line) = log_rx.recv() => if !opts.quiet { say(&bar, &line) },
            st = coord.wait() => break st?,
            _ = poll.tick() => match client.as_mut() {
                None => {
                    if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                        let url = format!("{}://{}", security.scheme(), addr.trim());
                        workers.start(&url, n, &devices)?;
                        let access = crate::worker::Access {
                            token: token.clone(),
                            security: security.clone(),
                            server_name: None,
                        };
                        client = Some(crate::worker::connect(&url, &access, Duration::from_secs(10)).await?);
                    } else if started.elapsed() > Duration::from_secs(600) {
                        anyhow::bail!("the coordinator did not start listening within 10 minutes");
                    }
                }
                Some(c) => {
                    workers.restart_failed(|s| say(&bar, s))?;
                    if let Ok(s) = c.status(proto::StatusRequest {}).await {
                        let s = s.into_inner();
                        workers.name_ranks(&s.members);
                        show_status(&bar, &s);
                    }
                }
            }
        }
    };
    // Drain what the processes still print, give workers a moment to leave, then stop them.
    workers.stop(Instant::now() + Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    while let Ok(line) = log_rx.try_recv() {
        if !opts.quiet {
            say(&bar, &line);
        }
    }
    bar.finish_and_clear();
    let code = status.code().unwrap_or(1);
    if !opts.quiet {
        print_summary(&state_dir, code)?;
    }
    Ok(code)
}

/// The job's human summary from its summary.json.
fn print_summary(state_dir: &Path, code: i32) -> anyhow::Result<()> {
    match std::fs::read(state_dir.join("summary.json")) {
        Ok(b) => {
            let s: Summary = serde_json::from_slice(&b)?;
            eprintln!("{}", crate::coordinator::human_summary(&s, state_dir));
        }
        Err(_) => eprintln!(
            "tandem launch: the coordinator exited with status {code} and wrote no summary"
        ),
    }
    Ok(())
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
            insecure: false,
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
