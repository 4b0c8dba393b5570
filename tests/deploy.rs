//! The Kubernetes deployment (`deploy/`), checked without a cluster. `scripts/check-deploy.sh`
//! renders every overlay to `target/deploy/<overlay>.yaml` and validates it against the
//! Kubernetes schemas; these tests check that the rendered objects fit the binary:
//! the job config in the ConfigMap passes `tandem config check`, every container's command
//! line parses with the real CLI and agrees with the ports, mounts and Services around it, the
//! pods follow the security rules of deploy/README.md (mutual TLS on the control plane, each
//! role with its own Secret), the cert-manager example issues the Secrets the pods mount, and
//! the cpu-smoke topology, started by hand on 127.0.0.1 with the manifests' arguments,
//! environment and TLS Secrets, completes its job.

use std::collections::{BTreeMap, BTreeSet};
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
/// The Secret keys tandem reads from a TLS directory (`tandem::tls::TlsFiles::find`) for a
/// role: `tandem certs init`'s file names, or a Kubernetes TLS Secret's (cert-manager's).
fn tls_layouts(role: &str) -> [[String; 3]; 2] {
    [
        [
            "ca.pem".into(),
            format!("{role}.pem"),
            format!("{role}.key"),
        ],
        ["ca.crt".into(), "tls.crt".into(), "tls.key".into()],
    ]
}

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

/// The kustomization scripts/check-deploy.sh renders to target/deploy/<name>.yaml.
fn kustomization(name: &str) -> PathBuf {
    match name {
        "cert-manager" | "corpus" => repo().join("deploy").join(name),
        overlay => repo().join("deploy/overlays").join(overlay),
    }
}

/// `kubectl kustomize` of a kustomization, if a kubectl with a modern kustomize is at hand (on
/// PATH, or the one scripts/check-deploy.sh fetched).
fn render_with_kubectl(name: &str) -> Option<String> {
    let cached = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/tandem/kubectl-v33/kubectl"))
        .filter(|p| p.exists());
    let candidates = [Some(PathBuf::from("kubectl")), cached];
    for kubectl in candidates.into_iter().flatten() {
        let out = Command::new(&kubectl)
            .arg("kustomize")
            .arg(kustomization(name))
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
             every kustomization)",
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

        // Coordinator: `tandem coordinator --config … --listen 0.0.0.0:50051`, probed over TCP.
        let coord = container(
            find(&docs, "StatefulSet", "tandem-coordinator"),
            "coordinator",
        );
        let argv: Vec<String> = std::iter::once(ENTRYPOINT.to_string())
            .chain(strings(&coord["args"]))
            .collect();
        let cli = Cli::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{overlay}: {argv:?} does not parse:\n{e}"));
        let Cmd::Coordinator(tandem::cli::CoordinatorArgs {
            listen,
            config,
            health_listen,
            ..
        }) = cli.command
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
        // The kubelet's gRPC probe speaks plaintext and shows no client certificate: against
        // the mutual-TLS port it could never pass. Every probe goes to the plaintext health
        // listener; startup and readiness ask for the coordinator's service (serving once the
        // job is prepared), liveness for the process.
        let health = health_listen
            .unwrap_or_else(|| panic!("{overlay}: the coordinator needs --health-listen"));
        assert_eq!(u64::from(health.port()), container_port(coord, "health"));
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let p = &coord[probe]["grpc"];
            assert_eq!(
                p["port"].as_u64(),
                Some(u64::from(health.port())),
                "{overlay}: coordinator {probe} must ask the health listener"
            );
            let service = if probe == "livenessProbe" {
                None
            } else {
                Some("tandem.v1.Coordinator")
            };
            assert_eq!(p["service"].as_str(), service, "{overlay}: {probe}");
        }

        // Workers: `tandem worker --coordinator https://tandem-coordinator:50051 --ring-listen …`.
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
            format!("https://tandem-coordinator:{}", port(coord_svc, "grpc")),
            "{overlay}: workers must dial the coordinator's Service, over TLS"
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

/// Every container of a pod, init containers included.
fn all_containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten())
        .collect()
}

/// The command line a container runs after the image's ENTRYPOINT (`tandem`), or None when it
/// replaces the ENTRYPOINT with something else.
fn tandem_argv(c: &Value) -> Option<Vec<String>> {
    let mut argv = vec![];
    if !c["command"].is_null() {
        let command = strings(&c["command"]);
        if command.first().map(|p| Path::new(p).file_name()) != Some(Some(ENTRYPOINT.as_ref())) {
            return None;
        }
        argv.extend(command.into_iter().skip(1));
    }
    if !c["args"].is_null() {
        argv.extend(strings(&c["args"]));
    }
    Some(argv)
}

/// `coordinator` or `worker` when the container runs that `tandem` subcommand.
fn tandem_role(c: &Value) -> Option<String> {
    tandem_argv(c)?
        .into_iter()
        .next()
        .filter(|a| a == "coordinator" || a == "worker")
}

/// A container's setting of `flag`: from its command line, else the literal value of `env`
/// (the variable clap reads for that flag).
fn setting(c: &Value, flag: &str, env: &str) -> Option<String> {
    let args = tandem_argv(c).unwrap_or_default();
    if let Some(i) = args.iter().position(|a| a == flag) {
        return Some(args[i + 1].clone());
    }
    if let Some(v) = args
        .iter()
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
    {
        return Some(v.to_string());
    }
    let e = c["env"].as_array()?.iter().find(|e| e["name"] == env)?;
    Some(
        e["value"]
            .as_str()
            .unwrap_or_else(|| panic!("{env}: expected a literal value, got {e}"))
            .to_string(),
    )
}

/// The name of every Secret a pod can read: volumes (plain and projected) and env.
fn pod_secrets(pod: &Value) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut add = |v: &Value| {
        if let Some(n) = v.as_str() {
            names.insert(n.to_string());
        }
    };
    for v in pod["volumes"].as_array().into_iter().flatten() {
        add(&v["secret"]["secretName"]);
        for source in v["projected"]["sources"].as_array().into_iter().flatten() {
            add(&source["secret"]["name"]);
        }
    }
    for c in all_containers(pod) {
        for e in c["env"].as_array().into_iter().flatten() {
            add(&e["valueFrom"]["secretKeyRef"]["name"]);
        }
        for e in c["envFrom"].as_array().into_iter().flatten() {
            add(&e["secretRef"]["name"]);
        }
    }
    names
}

/// A tandem container's TLS directory (`--tls-dir` or `TANDEM_TLS_DIR`) and the Secret volume
/// (its `secret` object) mounted there, read-only.
fn tls_volume<'a>(pod: &'a Value, c: &Value, what: &str) -> (String, &'a Value) {
    let dir = setting(c, "--tls-dir", "TANDEM_TLS_DIR").unwrap_or_else(|| {
        panic!("{what}: neither --tls-dir nor TANDEM_TLS_DIR (tandem refuses to start)")
    });
    let mount = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == dir.as_str())
        .unwrap_or_else(|| panic!("{what}: nothing is mounted at the TLS directory {dir}"));
    assert_eq!(mount["readOnly"], true, "{what}: mount {dir} read-only");
    assert!(
        mount["subPath"].is_null(),
        "{what}: a subPath mount never sees the Secret's updates"
    );
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("{what}: no volume {}", mount["name"]));
    assert!(
        volume["secret"].is_object(),
        "{what}: {dir} must be a Secret volume, not {volume}"
    );
    (dir, &volume["secret"])
}

/// Mutual TLS on the control plane (deploy/README.md, "TLS certificates"): every container that
/// runs `tandem coordinator` or `tandem worker` has a TLS directory and never `--insecure`; it
/// is a Secret of its own role's (`tandem-<role>-tls`), mounted read-only, readable by the
/// pod's group at most, with only the keys tandem reads for that role projected, in both
/// layouts; a pod reads no other Secret than that and the token (so no worker sees the
/// coordinator's key, and no pod the CA's); workers dial https.
#[test]
fn control_plane_is_mutual_tls_with_a_secret_per_role() {
    for overlay in OVERLAYS {
        let docs = rendered(overlay);
        let mut roles = BTreeSet::new();
        for sts in docs.iter().filter(|d| d["kind"] == "StatefulSet") {
            let name = sts["metadata"]["name"].as_str().unwrap();
            let pod = &sts["spec"]["template"]["spec"];
            let mut pod_roles = BTreeSet::new();
            for c in all_containers(pod) {
                let Some(role) = tandem_role(c) else {
                    continue;
                };
                let what = format!("{overlay}/{name}/{}", c["name"].as_str().unwrap());
                let argv = tandem_argv(c).unwrap();
                assert!(
                    !argv.iter().any(|a| a.starts_with("--insecure")),
                    "{what}: --insecure: a plaintext control plane"
                );
                assert!(
                    !c["env"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| e["name"] == "TANDEM_INSECURE"),
                    "{what}: TANDEM_INSECURE: a plaintext control plane"
                );
                let (dir, secret) = tls_volume(pod, c, &what);
                assert_eq!(
                    secret["secretName"],
                    format!("tandem-{role}-tls"),
                    "{what}: {dir} must hold the {role}'s own Secret"
                );
                // Unset, the kubelet writes 0644: world-readable keys.
                let mode = secret["defaultMode"].as_u64().unwrap_or(0o644);
                assert_eq!(
                    mode & 0o227,
                    0,
                    "{what}: defaultMode {mode:#o}: no one may write the key, nor read it \
                     outside the pod's user and group"
                );
                let items = secret["items"].as_array().unwrap_or_else(|| {
                    panic!("{what}: list the Secret's keys (items), so nothing else in it reaches the pod")
                });
                let mut keys = BTreeSet::new();
                for item in items {
                    let key = item["key"].as_str().unwrap();
                    assert_eq!(
                        item["path"], key,
                        "{what}: tandem looks for {key} under that name"
                    );
                    if let Some(m) = item["mode"].as_u64() {
                        assert_eq!(m & 0o227, 0, "{what}: {key}: mode {m:#o}");
                    }
                    keys.insert(key.to_string());
                }
                let readable: BTreeSet<String> = tls_layouts(&role).into_iter().flatten().collect();
                assert_eq!(
                    keys, readable,
                    "{what}: project the keys tandem reads for a {role}, in both layouts \
                     (`tandem certs init`, cert-manager), and nothing else"
                );
                assert_eq!(
                    secret["optional"], true,
                    "{what}: a Secret holds one layout, so the other's keys are missing: the \
                     volume must be optional or the pod never starts"
                );
                if role == "worker" {
                    let url = setting(c, "--coordinator", "TANDEM_COORDINATOR")
                        .unwrap_or_else(|| panic!("{what}: no coordinator URL"));
                    assert!(
                        url.starts_with("https://"),
                        "{what}: {url}: the coordinator is reached over TLS"
                    );
                }
                pod_roles.insert(role);
            }
            let allowed: BTreeSet<String> = std::iter::once("tandem-token".to_string())
                .chain(pod_roles.iter().map(|r| format!("tandem-{r}-tls")))
                .collect();
            assert_eq!(
                pod_secrets(pod),
                allowed,
                "{overlay}/{name}: the Secrets this pod can read (the job token and its own \
                 role's certificate only)"
            );
            roles.extend(pod_roles);
        }
        assert_eq!(
            roles,
            BTreeSet::from(["coordinator".to_string(), "worker".to_string()]),
            "{overlay}"
        );
    }
}

/// The fields of cert-manager.io/v1 objects (cert-manager's CRDs): kubernetes-validate has no
/// schema for them, so scripts/check-deploy.sh leaves deploy/cert-manager to this test.
const CERTIFICATE_FIELDS: &[&str] = &[
    "additionalOutputFormats",
    "commonName",
    "dnsNames",
    "duration",
    "emailAddresses",
    "encodeUsagesInRequest",
    "ipAddresses",
    "isCA",
    "issuerRef",
    "keystores",
    "literalSubject",
    "nameConstraints",
    "otherNames",
    "privateKey",
    "renewBefore",
    "renewBeforePercentage",
    "revisionHistoryLimit",
    "secretName",
    "secretTemplate",
    "signatureAlgorithm",
    "subject",
    "uris",
    "usages",
];
const ISSUER_FIELDS: &[&str] = &["acme", "ca", "selfSigned", "vault", "venafi"];
const CA_ISSUER_FIELDS: &[&str] = &[
    "crlDistributionPoints",
    "issuingCertificateURLs",
    "ocspServers",
    "secretName",
];
const ISSUER_REF_FIELDS: &[&str] = &["group", "kind", "name"];
const PRIVATE_KEY_FIELDS: &[&str] = &["algorithm", "encoding", "rotationPolicy", "size"];
const KEY_USAGES: &[&str] = &[
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
];

/// Fails on a field `known` does not list (kubernetes-validate's strict mode, by hand).
fn known_fields(what: &str, v: &Value, known: &[&str]) {
    let map = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: expected an object, got {v}"));
    for k in map.keys() {
        assert!(
            known.contains(&k.as_str()),
            "{what}: unknown field {k} (cert-manager.io/v1 knows {known:?})"
        );
    }
}

/// deploy/cert-manager, the alternative to making the Secrets by hand: its objects are
/// well-formed cert-manager.io/v1 Issuers and Certificates; every Secret the overlays mount
/// for TLS is written by one of its Certificates, for the right side of the handshake (server
/// auth for the coordinator, client auth for the workers), issued by a CA Issuer whose CA is
/// defined here, the same for both sides; the coordinator's certificate carries the host the
/// workers dial; and the pods project the keys cert-manager writes (ca.crt, tls.crt, tls.key).
#[test]
fn cert_manager_example_issues_the_secrets_the_pods_mount() {
    let docs = rendered("cert-manager");
    let mut issuers: BTreeMap<String, &Value> = BTreeMap::new();
    let mut certs: BTreeMap<String, &Value> = BTreeMap::new();
    for d in &docs {
        let name = d["metadata"]["name"].as_str().unwrap().to_string();
        assert_eq!(d["apiVersion"], "cert-manager.io/v1", "{name}");
        known_fields(&name, d, &["apiVersion", "kind", "metadata", "spec"]);
        assert!(
            d["metadata"]["namespace"].is_null(),
            "{name}: the job's namespace is given at apply time"
        );
        let spec = &d["spec"];
        match d["kind"].as_str().unwrap() {
            "Issuer" => {
                known_fields(&name, spec, ISSUER_FIELDS);
                assert_eq!(
                    spec.as_object().unwrap().len(),
                    1,
                    "{name}: one issuer type"
                );
                if spec["ca"].is_object() {
                    known_fields(&format!("{name}.ca"), &spec["ca"], CA_ISSUER_FIELDS);
                }
                issuers.insert(name, spec);
            }
            "Certificate" => {
                known_fields(&name, spec, CERTIFICATE_FIELDS);
                known_fields(&name, &spec["issuerRef"], ISSUER_REF_FIELDS);
                if !spec["privateKey"].is_null() {
                    known_fields(&name, &spec["privateKey"], PRIVATE_KEY_FIELDS);
                }
                assert!(spec["secretName"].is_string(), "{name}: no secretName");
                if !spec["usages"].is_null() {
                    for u in strings(&spec["usages"]) {
                        assert!(KEY_USAGES.contains(&u.as_str()), "{name}: usage {u:?}");
                    }
                }
                certs.insert(name, spec);
            }
            other => panic!(
                "{name}: {other}: only Issuers and Certificates, in the job's namespace (not a \
                 ClusterIssuer: the CA is the job's)"
            ),
        }
    }
    for (name, spec) in &certs {
        let r = &spec["issuerRef"];
        assert!(r["kind"].is_null() || r["kind"] == "Issuer", "{name}: {r}");
        assert!(
            r["group"].is_null() || r["group"] == "cert-manager.io",
            "{name}: {r}"
        );
        let issuer = r["name"].as_str().unwrap();
        assert!(
            issuers.contains_key(issuer),
            "{name}: its Issuer {issuer} is not in deploy/cert-manager"
        );
    }
    // The CA certificate behind a leaf: its issuer is a CA Issuer, whose Secret a CA
    // Certificate here writes.
    let ca_of = |leaf: &str, spec: &Value| -> String {
        let issuer = issuers[spec["issuerRef"]["name"].as_str().unwrap()];
        let secret = issuer["ca"]["secretName"]
            .as_str()
            .unwrap_or_else(|| panic!("{leaf}: not issued by a CA Issuer"));
        let (ca, ca_spec) = certs
            .iter()
            .find(|(_, c)| c["secretName"] == secret)
            .unwrap_or_else(|| {
                panic!("{leaf}: no Certificate here writes its CA's Secret {secret}")
            });
        assert_eq!(ca_spec["isCA"], true, "{ca}");
        ca.clone()
    };
    for overlay in OVERLAYS {
        let odocs = rendered(overlay);
        let worker_sts = find(&odocs, "StatefulSet", "tandem-worker");
        let url = flag_value(
            &strings(&container(worker_sts, "worker")["args"]),
            "--coordinator",
        )
        .to_string();
        let host = url
            .strip_prefix("https://")
            .and_then(|r| r.split([':', '/']).next())
            .unwrap_or_else(|| panic!("{overlay}: {url}"));
        let mut cas = BTreeSet::new();
        for (sts, role, usage, not) in [
            (
                "tandem-coordinator",
                "coordinator",
                "server auth",
                "client auth",
            ),
            ("tandem-worker", "worker", "client auth", "server auth"),
        ] {
            let what = format!("{overlay}/{sts}");
            let s = find(&odocs, "StatefulSet", sts);
            let (_, secret) = tls_volume(&s["spec"]["template"]["spec"], container(s, role), &what);
            let secret_name = secret["secretName"].as_str().unwrap();
            let (cert, spec) = certs
                .iter()
                .find(|(_, c)| c["secretName"] == secret_name)
                .unwrap_or_else(|| {
                    panic!("{what} mounts the Secret {secret_name}, which no Certificate writes")
                });
            let usages = strings(&spec["usages"]);
            assert!(
                usages.iter().any(|u| u == usage) && !usages.iter().any(|u| u == not),
                "{cert}: usages {usages:?}: a {role} certificate is for {usage} only"
            );
            assert_ne!(spec["isCA"], true, "{cert}");
            if role == "coordinator" {
                assert!(
                    strings(&spec["dnsNames"]).iter().any(|n| n == host),
                    "{cert}: the workers dial {url}: the certificate must carry {host}"
                );
            }
            let projected: Vec<&str> = secret["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["key"].as_str().unwrap())
                .collect();
            for key in ["ca.crt", "tls.crt", "tls.key"] {
                assert!(
                    projected.contains(&key),
                    "{what}: cert-manager writes {key}: the pod must project it"
                );
            }
            cas.insert(ca_of(cert, spec));
        }
        assert_eq!(
            cas.len(),
            1,
            "{overlay}: both sides trust one CA, so both must be issued by it: {cas:?}"
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

/// A Secret's content, as test files: key → file.
type Secrets = BTreeMap<&'static str, Vec<(&'static str, PathBuf)>>;

/// What the kubelet makes of a tandem container's TLS Secret volume, done here: the keys of
/// the Secret (from `secrets`) that the volume projects, with the volume's file modes, copied
/// into `local`, which then replaces the pod's TLS directory in `args` (`--tls-dir`) or `env`
/// (`TANDEM_TLS_DIR`).
fn mount_tls_secret(
    pod: &Value,
    c: &Value,
    secrets: &Secrets,
    local: &Path,
    args: &mut [String],
    env: &mut BTreeMap<String, String>,
) {
    use std::os::unix::fs::PermissionsExt;
    let what = c["name"].as_str().unwrap();
    let (_, volume) = tls_volume(pod, c, what);
    let name = volume["secretName"].as_str().unwrap();
    let data = secrets
        .get(name)
        .unwrap_or_else(|| panic!("{what}: the namespace has no Secret {name}"));
    let default_mode = volume["defaultMode"].as_u64().unwrap_or(0o644) as u32;
    let items: Vec<(String, String, u32)> = match volume["items"].as_array() {
        Some(items) => items
            .iter()
            .map(|i| {
                let mode = i["mode"].as_u64().map_or(default_mode, |m| m as u32);
                let key = i["key"].as_str().unwrap().to_string();
                (key, i["path"].as_str().unwrap().to_string(), mode)
            })
            .collect(),
        None => data
            .iter()
            .map(|(k, _)| (k.to_string(), k.to_string(), default_mode))
            .collect(),
    };
    std::fs::create_dir_all(local).unwrap();
    for (key, path, mode) in items {
        let Some((_, src)) = data.iter().find(|(k, _)| *k == key) else {
            // The kubelet skips a missing key of an optional volume, and fails the pod otherwise.
            assert_eq!(
                volume["optional"], true,
                "{what}: the Secret {name} has no key {key}: the pod would not start"
            );
            continue;
        };
        let dst = local.join(path);
        std::fs::copy(src, &dst).unwrap();
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let local = local.display().to_string();
    if let Some(i) = args.iter().position(|a| a == "--tls-dir") {
        args[i + 1] = local;
    } else {
        *env.get_mut("TANDEM_TLS_DIR").unwrap() = local;
    }
}

/// The cpu-smoke overlay as the cluster would run it, on 127.0.0.1: one coordinator and the
/// StatefulSet's worker pods as processes, with the containers' args and env and their TLS
/// Secrets mounted; only the addresses (loopback, port 0), the config path, the config's
/// in-pod paths and the TLS directories are rewritten (the workers still check the
/// coordinator's certificate against the host of the manifests' URL).
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

    // The two TLS Secrets from one `tandem certs init`, as deploy/README.md makes them: the
    // coordinator's with `kubectl create secret generic --from-file` of its files, the
    // workers' in cert-manager's layout (ca.crt, tls.crt, tls.key), so that the run goes
    // through both layouts the manifests project. The CA's key is in neither.
    let ca = dir.join("ca");
    let out = clean_command(bin())
        .args(["certs", "init", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tandem certs init failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secrets: Secrets = BTreeMap::from([
        (
            "tandem-coordinator-tls",
            vec![
                ("ca.pem", ca.join("ca.pem")),
                ("coordinator.pem", ca.join("coordinator.pem")),
                ("coordinator.key", ca.join("coordinator.key")),
            ],
        ),
        (
            "tandem-worker-tls",
            vec![
                ("ca.crt", ca.join("ca.pem")),
                ("tls.crt", ca.join("worker.pem")),
                ("tls.key", ca.join("worker.key")),
            ],
        ),
    ]);

    let log = |name: &str| Stdio::from(File::create(dir.join(format!("{name}.log"))).unwrap());
    let mut procs = Procs(vec![]);

    // Coordinator.
    let coord_sts = find(&docs, "StatefulSet", "tandem-coordinator");
    assert_eq!(coord_sts["spec"]["replicas"], 1);
    let coord = container(coord_sts, "coordinator");
    let addr_file = dir.join("addr");
    let mut args = strings(&coord["args"]);
    let health_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    for (flag, value) in [
        ("--config", config.display().to_string()),
        ("--listen", "127.0.0.1:0".to_string()),
        ("--health-listen", format!("127.0.0.1:{health_port}")),
    ] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value;
    }
    args.extend(["--addr-file".to_string(), addr_file.display().to_string()]);
    let mut env = pod_env(coord, "tandem-coordinator-0", "default", token);
    mount_tls_secret(
        &coord_sts["spec"]["template"]["spec"],
        coord,
        &secrets,
        &dir.join("tls-tandem-coordinator-0"),
        &mut args,
        &mut env,
    );
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
    // The kubelet's probes, as it sends them: plaintext gRPC health checks, no certificate.
    for service in ["", "tandem.v1.Coordinator"] {
        assert_eq!(
            health_check(health_port, service),
            Ok(1),
            "health of {service:?}\n{}",
            logs(&dir)
        );
    }

    // Workers: the StatefulSet's pods tandem-worker-0..N-1, dialling the manifests' scheme at
    // the loopback address, and checking the certificate for the manifests' host.
    let worker_sts = find(&docs, "StatefulSet", "tandem-worker");
    let replicas = worker_sts["spec"]["replicas"].as_u64().unwrap();
    let worker = container(worker_sts, "worker");
    let pod_url = flag_value(&strings(&worker["args"]), "--coordinator").to_string();
    let (scheme, rest) = pod_url.split_once("://").unwrap();
    let host = rest.split([':', '/']).next().unwrap();
    let url = format!(
        "{scheme}://{}",
        std::fs::read_to_string(&addr_file).unwrap().trim()
    );
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
        mount_tls_secret(
            &worker_sts["spec"]["template"]["spec"],
            worker,
            &secrets,
            &dir.join(format!("tls-{pod}")),
            &mut args,
            &mut env,
        );
        if !args.iter().any(|a| a.starts_with("--tls-server-name")) {
            env.entry("TANDEM_TLS_SERVER_NAME".into())
                .or_insert_with(|| host.to_string());
        }
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

/// A plaintext gRPC health check on 127.0.0.1:`port`, as the kubelet's `grpc` probe makes it:
/// the status (1 = SERVING) or the error.
fn health_check(port: u16, service: &str) -> Result<i32, String> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut c = HealthClient::new(ch);
        c.check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|e| e.to_string())
    })
}
