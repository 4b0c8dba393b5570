//! The Kubernetes deployment (`deploy/`), checked without a cluster. `scripts/check-deploy.sh`
//! renders every overlay to `target/deploy/<overlay>.yaml` and validates it against the
//! Kubernetes schemas; these tests check that the rendered objects fit the binary:
//! the job config in the ConfigMap passes `tandem config check`, every container's command
//! line parses with the real CLI and agrees with the ports, mounts and Services around it, the
//! pods follow the security rules of deploy/README.md, and the cpu-smoke topology, started by
//! hand on 127.0.0.1 with the manifests' arguments and environment, completes its job.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use serde::Deserialize;
use serde_json::Value;
use tandem::cli::{Cli, Command as Cmd};

const OVERLAYS: [&str; 2] = ["cpu-smoke", "gpu"];
/// The image's ENTRYPOINT (deploy/docker/Dockerfile*): argv[0] of every tandem container.
const ENTRYPOINT: &str = "tandem";
/// Where the Dockerfiles copy the repository's configs/ directory.
const IMAGE_CONFIGS: &str = "/opt/tandem/configs";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tandem")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn newest_mtime(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        let t = if meta.is_dir() {
            newest_mtime(&entry.path())
        } else {
            meta.modified().unwrap()
        };
        newest = newest.max(t);
    }
    newest
}

/// `kubectl kustomize` of an overlay, if a kubectl with a modern kustomize is at hand (on PATH,
/// or the one scripts/check-deploy.sh fetched).
fn render_with_kubectl(overlay: &str) -> Option<String> {
    let cached = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/tandem/kubectl-v33/kubectl"))
        .filter(|p| p.exists());
    let candidates = [Some(PathBuf::from("kubectl")), cached];
    for kubectl in candidates.into_iter().flatten() {
        let out = Command::new(&kubectl)
            .arg("kustomize")
            .arg(repo().join("deploy/overlays").join(overlay))
            .output();
        if let Ok(out) = out {
            if out.status.success() {
                return Some(String::from_utf8(out.stdout).unwrap());
            }
        }
    }
    None
}

/// The rendered objects of an overlay, as JSON values.
fn rendered(overlay: &str) -> Vec<Value> {
    let file = repo().join("target/deploy").join(format!("{overlay}.yaml"));
    let fresh = std::fs::metadata(&file)
        .and_then(|m| m.modified())
        .map(|t| t >= newest_mtime(&repo().join("deploy")))
        .unwrap_or(false);
    let text = if fresh {
        std::fs::read_to_string(&file).unwrap()
    } else if let Some(text) = render_with_kubectl(overlay) {
        text
    } else {
        panic!(
            "{} is missing or older than deploy/, and no kubectl with kustomize >= 4 can render \
             it: run scripts/check-deploy.sh (it installs what it needs, renders and validates \
             every overlay)",
            file.display()
        );
    };
    let mut docs = vec![];
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{overlay}: bad YAML: {e}"));
        if !v.is_null() {
            docs.push(v);
        }
    }
    assert!(!docs.is_empty(), "{overlay}: nothing rendered");
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// The ConfigMap generated from the overlay's job.toml (its name carries a content hash).
fn job_toml(docs: &[Value]) -> String {
    let cm = docs
        .iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("tandem-job"))
        })
        .expect("a ConfigMap tandem-job-<hash>");
    cm["data"]["job.toml"]
        .as_str()
        .expect("the ConfigMap holds job.toml")
        .to_string()
}

fn container<'a>(sts: &'a Value, name: &str) -> &'a Value {
    sts["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list, got {v}"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// The value that follows `flag` in a command line.
fn flag_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} missing from {args:?}"));
    &args[i + 1]
}

fn tmp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-deploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A command with no `TANDEM*` variable inherited from the test's environment.
fn clean_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars() {
        if k.starts_with("TANDEM") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn job_configs_pass_tandem_config_check_and_fit_the_manifests() {
    for overlay in OVERLAYS {
        let docs = rendered(overlay);
        let text = job_toml(&docs);
        let source = repo().join(format!("configs/k8s-{overlay}.toml"));
        assert_eq!(
            text,
            std::fs::read_to_string(&source).unwrap(),
            "{overlay}: the ConfigMap differs from {}: run scripts/check-deploy.sh --sync",
            source.display()
        );
        let dir = tmp_dir(&format!("check-{overlay}"));
        let path = dir.join("job.toml");
        std::fs::write(&path, &text).unwrap();
        let out = clean_command(bin())
            // The inputs are the pods' (the corpus volume, the image's files).
            .args(["config", "check", "--skip-inputs"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{overlay}: tandem config check failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cfg: Value = serde_json::from_slice(&out.stdout).unwrap();

        // The worker StatefulSet runs exactly as many pods as the job waits for.
        let workers = find(&docs, "StatefulSet", "tandem-worker");
        let replicas = workers["spec"]["replicas"].as_u64().unwrap();
        let (min, max) = (
            cfg["cluster"]["min_workers"].as_u64().unwrap(),
            cfg["cluster"]["max_workers"].as_u64().unwrap(),
        );
        assert!(
            min <= replicas && replicas <= max,
            "{overlay}: {replicas} worker replicas, but the job wants {min}..={max}"
        );

        // The coordinator reads this very file, keeps its state on the claim and sees the corpus.
        let coord_sts = find(&docs, "StatefulSet", "tandem-coordinator");
        let coord = container(coord_sts, "coordinator");
        let args = strings(&coord["args"]);
        let mounts: BTreeMap<String, String> = coord["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap().to_string(),
                    m["mountPath"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            flag_value(&args, "--config"),
            format!("{}/job.toml", mounts["job"]),
            "{overlay}: --config must name job.toml in the ConfigMap's mount"
        );
        assert_eq!(
            cfg["job"]["state_dir"], mounts["state"],
            "{overlay}: job.state_dir must be the state claim's mount"
        );
        let claims = strings(
            &coord_sts["spec"]["volumeClaimTemplates"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["metadata"]["name"].clone())
                .collect::<Value>(),
        );
        assert_eq!(claims, ["state"], "{overlay}: the coordinator's claim");
        for corpus in strings(&cfg["data"]["corpus"]) {
            if let Some(rest) = corpus.strip_prefix(&format!("{IMAGE_CONFIGS}/")) {
                assert!(
                    repo().join("configs").join(rest).exists(),
                    "{overlay}: {corpus} is baked into the image from configs/{rest}, which does not exist"
                );
            } else {
                assert!(
                    mounts.values().any(|m| Path::new(&corpus).starts_with(m)),
                    "{overlay}: corpus {corpus} is neither in the image nor on a mounted volume"
                );
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn container_command_lines_parse_and_match_the_services() {
    for overlay in OVERLAYS {
        let docs = rendered(overlay);
        let coord_svc = find(&docs, "Service", "tandem-coordinator");
        let worker_svc = find(&docs, "Service", "tandem-worker");
        let port = |svc: &Value, name: &str| -> u64 {
            svc["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("{overlay}: no port {name}"))["port"]
                .as_u64()
                .unwrap()
        };
        let container_port = |c: &Value, name: &str| -> u64 {
            c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("{overlay}: no container port {name}"))["containerPort"]
                .as_u64()
                .unwrap()
        };

        // Coordinator: `tandem coordinator --config … --listen 0.0.0.0:50051`, probed over gRPC.
        let coord = container(
            find(&docs, "StatefulSet", "tandem-coordinator"),
            "coordinator",
        );
        let argv: Vec<String> = std::iter::once(ENTRYPOINT.to_string())
            .chain(strings(&coord["args"]))
            .collect();
        let cli = Cli::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{overlay}: {argv:?} does not parse:\n{e}"));
        let Cmd::Coordinator(tandem::cli::CoordinatorArgs { listen, config, .. }) = cli.command
        else {
            panic!("{overlay}: the coordinator container does not run `tandem coordinator`");
        };
        assert_eq!(config, Path::new("/etc/tandem/job.toml"));
        assert!(
            listen.ip().is_unspecified(),
            "{overlay}: listen on every interface"
        );
        let grpc = u64::from(listen.port());
        assert_eq!(grpc, 50051);
        assert_eq!(container_port(coord, "grpc"), grpc);
        assert_eq!(port(coord_svc, "grpc"), grpc);
        assert_eq!(port(coord_svc, "metrics"), container_port(coord, "metrics"));
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                coord[probe]["grpc"]["port"].as_u64(),
                Some(grpc),
                "{overlay}: coordinator {probe} must use the gRPC health service"
            );
        }

        // Workers: `tandem worker --coordinator http://tandem-coordinator:50051 --ring-listen …`.
        let worker = container(find(&docs, "StatefulSet", "tandem-worker"), "worker");
        let argv: Vec<String> = std::iter::once(ENTRYPOINT.to_string())
            .chain(strings(&worker["args"]))
            .collect();
        let cli = Cli::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{overlay}: {argv:?} does not parse:\n{e}"));
        let Cmd::Worker(tandem::cli::WorkerArgs {
            coordinator,
            device,
            threads,
            ring_listen,
            ..
        }) = cli.command
        else {
            panic!("{overlay}: the worker container does not run `tandem worker`");
        };
        assert_eq!(
            coordinator,
            format!("http://tandem-coordinator:{}", port(coord_svc, "grpc")),
            "{overlay}: workers must dial the coordinator's Service"
        );
        assert!(ring_listen.ip().is_unspecified());
        let ring = u64::from(ring_listen.port());
        assert_eq!(container_port(worker, "ring"), ring);
        assert_eq!(port(worker_svc, "ring"), ring);
        assert_eq!(worker["startupProbe"]["tcpSocket"]["port"], "ring");
        assert!(threads >= 1);
        let gpus = &worker["resources"]["limits"]["nvidia.com/gpu"];
        if overlay == "gpu" {
            assert_eq!(device, "cuda:0");
            assert_eq!(gpus.as_u64(), Some(1), "gpu: one GPU per worker pod");
        } else {
            assert_eq!(device, "cpu");
            assert!(gpus.is_null(), "{overlay}: CPU workers ask for no GPU");
        }
    }
}

#[test]
fn pods_follow_the_security_and_lifecycle_rules() {
    for overlay in OVERLAYS {
        let docs = rendered(overlay);
        for sts in docs.iter().filter(|d| d["kind"] == "StatefulSet") {
            let name = sts["metadata"]["name"].as_str().unwrap();
            let pod = &sts["spec"]["template"]["spec"];
            let ctx = &pod["securityContext"];
            assert_eq!(ctx["runAsNonRoot"], true, "{overlay}/{name}");
            assert_eq!(ctx["runAsUser"], 65532, "{overlay}/{name}");
            assert_eq!(pod["enableServiceLinks"], false, "{overlay}/{name}");
            assert_eq!(
                pod["automountServiceAccountToken"], false,
                "{overlay}/{name}"
            );
            assert!(
                pod["terminationGracePeriodSeconds"].as_u64().unwrap() >= 60,
                "{overlay}/{name}: leave time for a final checkpoint"
            );
            let tmp_volume = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "tmp")
                .unwrap_or_else(|| panic!("{overlay}/{name}: no tmp volume"));
            assert!(tmp_volume["emptyDir"].is_object());
            for c in pod["containers"].as_array().unwrap() {
                let sc = &c["securityContext"];
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{overlay}/{name}");
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{overlay}/{name}");
                assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
                assert!(
                    c["volumeMounts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|m| m["name"] == "tmp" && m["mountPath"] == "/tmp"),
                    "{overlay}/{name}: /tmp must be writable"
                );
                for k in ["requests", "limits"] {
                    for r in ["cpu", "memory"] {
                        assert!(
                            c["resources"][k][r].is_string() || c["resources"][k][r].is_number(),
                            "{overlay}/{name}: resources.{k}.{r}"
                        );
                    }
                }
                // The token comes from the Secret, never from a literal.
                let token = c["env"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|e| e["name"] == "TANDEM_TOKEN")
                    .unwrap_or_else(|| panic!("{overlay}/{name}: no TANDEM_TOKEN"));
                assert_eq!(token["valueFrom"]["secretKeyRef"]["name"], "tandem-token");
                assert!(token.get("value").is_none());
            }
        }
        // Stable per-pod DNS names for the ring, published before readiness.
        let svc = find(&docs, "Service", "tandem-worker");
        assert_eq!(svc["spec"]["clusterIP"], "None");
        assert_eq!(svc["spec"]["publishNotReadyAddresses"], true);
        let sts = find(&docs, "StatefulSet", "tandem-worker");
        assert_eq!(sts["spec"]["serviceName"], "tandem-worker");
        assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
        let env = pod_env(container(sts, "worker"), "tandem-worker-3", "ns", "t");
        assert_eq!(env["TANDEM_WORKER_ID"], "tandem-worker-3");
        assert_eq!(
            env["TANDEM_ADVERTISE_HOST"],
            "tandem-worker-3.tandem-worker.ns.svc"
        );
    }
}

/// A container's environment as the kubelet would build it for pod `pod` in `namespace`, with
/// `token` as the Secret's value: `$(VAR)` refers to variables defined before it.
fn pod_env(c: &Value, pod: &str, namespace: &str, token: &str) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_string();
            for (k, val) in &env {
                v = v.replace(&format!("$({k})"), val);
            }
            assert!(
                !v.contains("$("),
                "{name}={v}: refers to an undefined variable"
            );
            v
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match path {
                "metadata.name" => pod.to_string(),
                "metadata.namespace" => namespace.to_string(),
                other => panic!("{name}: fieldRef {other} not simulated"),
            }
        } else if e["valueFrom"]["secretKeyRef"]["name"] == "tandem-token" {
            token.to_string()
        } else {
            panic!("{name}: {e} not simulated");
        };
        env.insert(name, value);
    }
    env
}

/// Kills every process still running when dropped (a failed assertion included).
struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn logs(dir: &Path) -> String {
    let mut s = String::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            s += &format!("--- {} (last lines)\n", p.display());
            for l in tail.iter().rev() {
                s += l;
                s.push('\n');
            }
        }
    }
    s
}

fn wait_for(
    child: &mut Child,
    limit: Duration,
    what: &str,
    dir: &Path,
) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "{what} did not finish within {limit:?}\n{}",
            logs(dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cpu-smoke overlay as the cluster would run it, on 127.0.0.1: one coordinator and the
/// StatefulSet's worker pods as processes, with the containers' args and env; only the
/// addresses (loopback, port 0), the config path and the config's in-pod paths are rewritten.
#[test]
fn cpu_smoke_topology_completes_on_loopback() {
    let docs = rendered("cpu-smoke");
    let dir = tmp_dir("smoke");
    let token = "deploy-test-token";

    // The ConfigMap's job, with the pod paths mapped here: the state claim to a temp dir, the
    // corpus baked into the image to the repository's configs/.
    let mut job: toml::Table = toml::from_str(&job_toml(&docs)).unwrap();
    job["job"]["state_dir"] = toml::Value::String(dir.join("state").display().to_string());
    let corpus: Vec<toml::Value> = job["data"]["corpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let c = c.as_str().unwrap();
            let rest = c
                .strip_prefix(&format!("{IMAGE_CONFIGS}/"))
                .unwrap_or_else(|| panic!("cpu-smoke must use the corpus in the image, not {c}"));
            toml::Value::String(repo().join("configs").join(rest).display().to_string())
        })
        .collect();
    job["data"]["corpus"] = toml::Value::Array(corpus);
    let stage_steps = job["stages"][0]["max_steps"].as_integer();
    let config = dir.join("job.toml");
    std::fs::write(&config, toml::to_string(&job).unwrap()).unwrap();

    let log = |name: &str| Stdio::from(File::create(dir.join(format!("{name}.log"))).unwrap());
    let mut procs = Procs(vec![]);

    // Coordinator.
    let coord_sts = find(&docs, "StatefulSet", "tandem-coordinator");
    assert_eq!(coord_sts["spec"]["replicas"], 1);
    let coord = container(coord_sts, "coordinator");
    let addr_file = dir.join("addr");
    let mut args = strings(&coord["args"]);
    for (flag, value) in [
        ("--config", config.display().to_string()),
        ("--listen", "127.0.0.1:0".to_string()),
    ] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value;
    }
    args.extend(["--addr-file".to_string(), addr_file.display().to_string()]);
    let env = pod_env(coord, "tandem-coordinator-0", "default", token);
    let child = clean_command(bin())
        .args(&args)
        .envs(&env)
        .stdout(Stdio::null())
        .stderr(log("coordinator"))
        .spawn()
        .unwrap();
    procs.0.push(("coordinator".into(), child));
    let start = Instant::now();
    while !addr_file.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the coordinator did not start listening\n{}",
            logs(&dir)
        );
        if let Some(s) = procs.0[0].1.try_wait().unwrap() {
            panic!("the coordinator exited with {s}\n{}", logs(&dir));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!(
        "http://{}",
        std::fs::read_to_string(&addr_file).unwrap().trim()
    );

    // Workers: the StatefulSet's pods tandem-worker-0..N-1.
    let worker_sts = find(&docs, "StatefulSet", "tandem-worker");
    let replicas = worker_sts["spec"]["replicas"].as_u64().unwrap();
    let worker = container(worker_sts, "worker");
    for i in 0..replicas {
        let pod = format!("tandem-worker-{i}");
        let mut args = strings(&worker["args"]);
        for (flag, value) in [
            ("--coordinator", url.clone()),
            ("--ring-listen", "127.0.0.1:0".to_string()),
        ] {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1] = value;
        }
        let mut env = pod_env(worker, &pod, "default", token);
        assert_eq!(env["TANDEM_WORKER_ID"], pod);
        assert_eq!(
            env["TANDEM_ADVERTISE_HOST"],
            format!("{pod}.tandem-worker.default.svc")
        );
        env.insert("TANDEM_ADVERTISE_HOST".into(), "127.0.0.1".into());
        let child = clean_command(bin())
            .args(&args)
            .envs(&env)
            .stdout(Stdio::null())
            .stderr(log(&pod))
            .spawn()
            .unwrap();
        procs.0.push((pod, child));
    }

    let (_, coord_child) = &mut procs.0[0];
    let status = wait_for(coord_child, Duration::from_secs(120), "the job", &dir);
    assert!(status.success(), "the coordinator failed\n{}", logs(&dir));
    for (name, child) in procs.0.iter_mut().skip(1) {
        let status = wait_for(child, Duration::from_secs(30), name, &dir);
        assert!(status.success(), "{name} failed\n{}", logs(&dir));
    }
    let summary: Value =
        serde_json::from_slice(&std::fs::read(dir.join("state/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "completed", "{summary:#}");
    assert_eq!(summary["world_size"], replicas, "{summary:#}");
    let stage = &summary["stages"][0];
    assert_eq!(stage["replicas_identical"], true, "{summary:#}");
    if let Some(steps) = stage_steps {
        assert_eq!(stage["steps"].as_i64(), Some(steps), "{summary:#}");
    }
    assert!(dir.join("state/final/model.safetensors").exists());
    drop(procs);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Runs scripts/gpu-check.sh as a dry run on this CPU (GPU_CHECK_DEVICE=cpu) with `env`;
/// returns whether it succeeded, its summary (the last line of stdout) and its stderr.
fn gpu_check_dry_run(env: &[(&str, &str)]) -> (bool, Value, String) {
    let mut cmd = Command::new(repo().join("scripts/gpu-check.sh"));
    cmd.arg(bin())
        .current_dir(repo())
        .env("GPU_CHECK_DEVICE", "cpu")
        .env("GPU_CHECK_PRESET", "tiny")
        .env("GPU_CHECK_BENCH_STEPS", "2")
        .env("GPU_CHECK_BENCH_WARMUP", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no summary:\n{err}"));
    let summary: Value = serde_json::from_str(last).unwrap();
    (out.status.success(), summary, err)
}

/// scripts/gpu-check.sh, dry run on this CPU: its "device" jobs run the composed candle ops
/// and the on-device update a GPU runs (TANDEM_FUSED_KERNELS=0, TANDEM_DEVICE_UPDATE=1)
/// against the fused CPU kernels and the host update, so every step of the script runs on
/// every CI run and the GPU's code path must train the same trajectory, step by step, with
/// dropout off and on (the same Philox masks), with one and with two workers, through
/// checkpoints and fine-tuning; the summary carries every bench's figures.
#[test]
fn gpu_check_script_dry_run_passes_on_the_cpu() {
    let (ok, last, err) = gpu_check_dry_run(&[("GPU_CHECK_STEPS", "10")]);
    assert!(ok, "{err}");
    assert_eq!(last["ok"], true, "{last}");
    assert_eq!(last["failed_steps"], serde_json::json!([]), "{last}");
    let steps = last["steps_run"].as_object().unwrap();
    assert_eq!(steps.len(), 13, "preflight, 7 jobs, 5 benches: {last}");
    for k in [
        "loss_rel_diff_no_dropout",
        "loss_rel_diff_1_worker",
        "loss_rel_diff_2_workers",
    ] {
        let d = last["checks"][k]["value"].as_f64().unwrap();
        assert!(
            d < 1e-4,
            "{k} = {d}: the composed ops drift from the fused kernels"
        );
    }
    assert_eq!(last["checks"]["nccl"]["value"], false, "no NCCL on a CPU");
    for b in ["bench_f32_b32", "bench_bf16_b32", "bench_f32_b128"] {
        let bench = &last["bench"][b];
        assert!(bench["gflops"].as_f64().unwrap() > 0.0, "{b}: {bench}");
        // HF's count includes the MLM head at every position; tandem runs it at the masked ones.
        assert!(
            bench["executed_gflops"].as_f64().unwrap() < bench["gflops"].as_f64().unwrap(),
            "{b}: {bench}"
        );
        assert!(bench["phases"]["forward_ms"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(last["bench"]["bench_f32_b128"]["batch"], 128);
    // The bf16 run really ran in bf16 (its losses differ) and stayed close to f32.
    let d = last["checks"]["loss_rel_diff_bf16"]["value"]
        .as_f64()
        .unwrap();
    assert!(d > 0.0 && d < 0.05, "bf16 against f32: {d}");
}

/// A step that fails is recorded, the steps after it still run, and the summary is written
/// (the script then exits with an error).
#[test]
fn gpu_check_script_goes_on_past_a_failed_step() {
    let (ok, last, err) = gpu_check_dry_run(&[
        ("GPU_CHECK_STEPS", "2"),
        ("GPU_CHECK_FAIL_STEP", "job_2w_gpu"),
    ]);
    assert!(!ok, "a failed step fails the check:\n{err}");
    assert_eq!(last["ok"], false, "{last}");
    assert_eq!(
        last["failed_steps"],
        serde_json::json!(["job_2w_gpu"]),
        "{last}"
    );
    let steps = &last["steps_run"];
    for later in [
        "job_2w_cpu",
        "job_bf16_gpu",
        "bench_f32_b32",
        "bench_bf16_b128",
    ] {
        assert_eq!(
            steps[later]["status"], "ok",
            "{later} ran after the failure: {last}"
        );
    }
    // The comparison that needed the failed job says so; the others still hold.
    assert_eq!(last["checks"]["loss_rel_diff_2_workers"]["ok"], false);
    assert_eq!(
        last["checks"]["loss_rel_diff_1_worker"]["ok"], true,
        "{last}"
    );
    assert!(err.contains("job_2w_gpu: failed"), "{err}");
}
