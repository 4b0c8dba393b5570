//! Small helpers shared across areas: atomic file writes, stable hashing, seeded RNGs.

#![warn(missing_docs)]

use std::io::Write;
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync of
/// the directory. A crash leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.unwrap_or_else(|| "file".into()),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// FNV-1a, 64 bit: a hash that is the same on every machine and every run.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Mixes several words into one seed (splitmix64 finaliser over a running state).
pub fn mix_seed(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for p in parts {
        h ^= p.wrapping_add(0x9e37_79b9_7f4a_7c15);
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
    }
    h
}

/// A portable, seeded RNG (ChaCha8): the same stream on every platform.
pub fn rng(parts: &[u64]) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix_seed(parts))
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The median of `v` (the mean of the middle two for an even count; NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// CPU time (user + system) this process has used, in seconds.
pub fn process_cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage writes a plain C struct that we own; an error leaves it unread.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return None;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    Some(t(u.ru_utime) + t(u.ru_stime))
}

/// The compute device named by `--device`: `cpu`, `cuda` (GPU 0) or `cuda:N`. A CUDA device
/// needs a build with the `cuda` feature (`scripts/build-cuda.sh`); without it, or without the
/// GPU, the error says which.
pub fn parse_device(name: &str) -> Result<candle_core::Device> {
    match device_ordinal(name)? {
        None => Ok(candle_core::Device::Cpu),
        // A stream of its own, not the per-thread default one: every kernel, copy and NCCL call
        // of the worker is ordered on it whichever thread issues it.
        Some(ordinal) => candle_core::Device::new_cuda_with_stream(ordinal)
            .map_err(|e| Error::Device(format!("device {name:?}: cannot open GPU {ordinal}: {e}"))),
    }
}

/// `tandem launch --device`: one device for every worker, or a comma-separated list that
/// worker `i` takes entry `i mod len` of (`cuda:0,cuda:1`: one GPU each, as a local rank
/// would). Every entry is checked as [`device_ordinal`] does.
pub fn worker_devices(spec: &str) -> Result<Vec<String>> {
    let list: Vec<String> = spec.split(',').map(|d| d.trim().to_string()).collect();
    for d in &list {
        device_ordinal(d)?;
    }
    Ok(list)
}

/// The first GPU that two of `n` workers would share when worker `i` takes entry `i mod len`
/// of `devices` (as [`worker_devices`] deals them): NCCL wants one GPU per rank.
pub fn shared_gpu(devices: &[String], n: usize) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    (0..n)
        .filter_map(|i| parse_ordinal(&devices[i % devices.len()]).ok().flatten())
        .find(|gpu| !seen.insert(*gpu))
        .map(|gpu| format!("cuda:{gpu}"))
}

/// The GPU index a `--device` name means (`None` for the CPU), by its spelling alone.
fn parse_ordinal(name: &str) -> Result<Option<usize>> {
    match name {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Some(n)),
            _ => Err(Error::Device(format!(
                "device {name:?}: expected cpu, cuda or cuda:N (N a GPU index)"
            ))),
        },
    }
}

/// Checks a `--device` name without opening the device: `None` for the CPU, else the GPU index.
pub fn device_ordinal(name: &str) -> Result<Option<usize>> {
    let Some(ordinal) = parse_ordinal(name)? else {
        return Ok(None);
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Device(format!(
            "device {name:?}: this tandem was built without the `cuda` feature; build it with \
             scripts/build-cuda.sh (or cargo build --release --features cuda), or use --device cpu"
        )));
    }
    Ok(Some(ordinal))
}

/// glibc's defaults return freed large blocks to the kernel at once, so every candle op pays
/// for fresh page faults (~35% of a CPU training step). Keep them in the heap instead.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Sets the number of CPU threads for matmul (rayon, used by gemm), candle's element-wise
/// pool and our fused kernels. Must run before the first tensor operation.
pub fn set_threads(threads: usize) {
    let t = threads.max(1).to_string();
    std::env::set_var("RAYON_NUM_THREADS", &t);
    // candle's element-wise pool; an explicit CANDLE_NUM_THREADS wins (for experiments).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", &t);
    }
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build_global();
}

/// Whether `name` (from the wire or from a file: a checkpoint's name, a manifest's or an HF
/// index's file, a dataset's name) is a plain file name, safe to join to a directory: one
/// path component, not hidden, not `.` or `..`, no separator or NUL, at most 255 bytes.
pub fn plain_file_name(name: &str) -> bool {
    !(name.is_empty()
        || name.len() > 255
        || name.starts_with('.')
        || name.contains(['/', '\\', '\0']))
}

/// `bytes` random bytes from the OS-seeded CSPRNG, as lower-case hex (tokens, secrets, ids).
pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_file_names_pass() {
        for ok in [
            "model.safetensors",
            "stage0-final",
            "train.tsv",
            "a..b",
            "x-00001-of-00002",
        ] {
            assert!(plain_file_name(ok), "{ok}");
        }
        let long = "x".repeat(256);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc/passwd",
            "a\\b",
            ".hidden",
            "a\0b",
            &long,
        ] {
            assert!(!plain_file_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn shared_gpu_finds_two_workers_on_one_gpu() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(shared_gpu(&v(&["cpu"]), 4), None);
        assert_eq!(shared_gpu(&v(&["cuda:0"]), 1), None);
        assert_eq!(shared_gpu(&v(&["cuda:0"]), 2), Some("cuda:0".into()));
        assert_eq!(shared_gpu(&v(&["cuda:0", "cuda:1"]), 2), None);
        assert_eq!(
            shared_gpu(&v(&["cuda:0", "cuda:1"]), 3),
            Some("cuda:0".into())
        );
        assert_eq!(
            shared_gpu(&v(&["cuda", "cuda:0"]), 2),
            Some("cuda:0".into())
        );
        assert_eq!(shared_gpu(&v(&["cpu", "cuda:1"]), 3), None);
    }

    #[test]
    fn devices_are_parsed_with_clear_errors() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let e = parse_device("gpu0").unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        if !candle_core::utils::cuda_is_available() {
            let e = parse_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("without the `cuda` feature"), "{e}");
        }
    }

    #[test]
    fn launch_device_lists_map_workers_round_robin() {
        assert_eq!(worker_devices("cpu").unwrap(), ["cpu"]);
        assert_eq!(worker_devices("cpu, cpu").unwrap(), ["cpu", "cpu"]);
        let e = worker_devices("cpu,tpu:1").unwrap_err().to_string();
        assert!(e.contains("\"tpu:1\"") && e.contains("expected cpu"), "{e}");
        if !candle_core::utils::cuda_is_available() {
            let e = worker_devices("cpu,cuda:1").unwrap_err().to_string();
            assert!(e.contains("without the `cuda` feature"), "{e}");
        }
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary() {
        let dir = tempdir();
        let p = dir.join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn seeds_differ_by_part_and_order() {
        assert_ne!(mix_seed(&[1, 2]), mix_seed(&[2, 1]));
        assert_ne!(mix_seed(&[1]), mix_seed(&[1, 0]));
        assert_eq!(fnv1a(b"bert"), fnv1a(b"bert"));
    }

    pub(crate) fn tempdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "tandem-test-{}-{}",
            std::process::id(),
            fnv1a(format!("{:?}", std::thread::current().id()).as_bytes())
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
