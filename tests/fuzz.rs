//! The fuzz suite (issue #16 item 5), on stable Rust: structured random and mutated inputs,
//! drawn by proptest, against every decoder that takes bytes from outside — corpus files and
//! the shard index, HF `config.json`, safetensors (single and sharded), checkpoint files,
//! tokenizer directories, TOML job configs with `--set` overrides, the fine-tuning formats
//! (classification TSV/JSONL, CoNLL, SQuAD, label maps), `predict` inputs, the ring's
//! listener handshake over a real 127.0.0.1 socket, and gRPC requests to a real coordinator.
//!
//! Every input must give `Ok` or an error that says where (file, line, key) — never a panic, a
//! hang or an unbounded allocation. Where a decoder has a twin (parse vs. stream, scan vs.
//! shard, save vs. load, the JSON a coordinator sends its workers), both must agree.
//!
//! Bounds:
//! - `TANDEM_FUZZ_CASES` (default [`DEFAULT_CASES`]): random cases of the cheapest targets;
//!   every target runs that times its weight (at least 1; 0 replays the regressions only).
//! - `TANDEM_FUZZ_SEED`: the base seed (printed with every target's counts), to reproduce a run.
//! - `TANDEM_FUZZ_VERBOSE`: print every panic as it happens (they are otherwise reported once,
//!   with the shrunk input).
//! - A watchdog fails a target whose case runs longer than [`CASE_LIMIT`], naming the input.
//! - This binary's allocator refuses any single allocation over [`ALLOC_LIMIT`] (the process
//!   then aborts, naming the target).
//!
//! Each target first replays its committed regression cases, `tests/fuzz/<target>/<case>/`
//! (the files of the input, and `params.json` where the target takes parameters). A failing
//! random case is shrunk and saved under `target/fuzz-failures/<target>/`: copy that directory
//! into `tests/fuzz/<target>/` to keep it. Per-target counts and times go to stderr and to
//! `target/fuzz-summary.txt` (which `.ci/run` prints).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestError, TestRunner};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;

use tandem::comm::ring::{RingListener, Transport};
use tandem::comm::{Collective, Ring, RingConfig};
use tandem::config::{ConfigError, JobConfig};
use tandem::data::corpus::{
    parse_documents, CorpusOptions, Document, DocumentReader, ErrorPolicy, Format,
};
use tandem::data::finetune::{
    collate_classification, collate_qa, collate_tokens, ClassificationSet, LabelMap, Padding,
    QaOptions, QaSet, TokenSet,
};
use tandem::data::shard::{build_index, parse_shard, ShardIndex};
use tandem::data::tokenizer::Tokenizer;
use tandem::model::hf::{load_weights, read_tensors, safetensors_bytes, tensors_from_bytes};
use tandem::model::{BertConfig, ParamStore, PretrainModel, TaskHead};
use tandem::predict::{Inputs, PredictOptions, Predictor};
use tandem::train::checkpoint::{restore_store, store_files, TrainerState};
use tandem::train::{AdamW, AdamWConfig};
use tandem::Error;

// ------------------------------------------------------------------------------------------
// Bounds: the allocator, the case counts, the watchdog.

/// The largest single allocation this test binary grants. Nothing a decoder does with the
/// small inputs here needs more; a length field taken on trust does.
const ALLOC_LIMIT: usize = 2 << 30;

/// Random cases of the cheapest targets when `TANDEM_FUZZ_CASES` is unset: sized so that the
/// whole suite takes about a minute in release mode on two cores.
const DEFAULT_CASES: u32 = 4000;

/// Longest a single case may run before the target fails as hung.
const CASE_LIMIT: Duration = Duration::from_secs(60);

thread_local! {
    /// The target this thread runs, for the allocator's message.
    static TARGET: Cell<&'static str> = const { Cell::new("") };
    /// Random cases whose input the decoder under test accepted (the rest it refused).
    static ACCEPTED: Cell<u64> = const { Cell::new(0) };
    /// The running target's temporary directory (removed when it passes).
    static ROOT: std::cell::RefCell<PathBuf> = std::cell::RefCell::new(PathBuf::new());
}

/// Counts a case whose input was accepted: the summary shows how many got past the decoder.
fn accepted() {
    ACCEPTED.with(|c| c.set(c.get() + 1));
}

/// Refuses (and reports, without allocating) a request over [`ALLOC_LIMIT`].
fn refuse(size: usize) -> bool {
    if size <= ALLOC_LIMIT {
        return false;
    }
    let target = TARGET.try_with(Cell::get).unwrap_or("");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = size;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for part in [
        b"fuzz: refused a single allocation of ".as_slice(),
        &digits[i..],
        b" bytes (the bound is 2 GiB) in target `",
        target.as_bytes(),
        b"`\n",
    ] {
        // SAFETY: writes a valid buffer to stderr; nothing is allocated.
        unsafe {
            libc::write(2, part.as_ptr().cast(), part.len());
        }
    }
    true
}

struct Bounded;

// SAFETY: every call is forwarded to `System` unchanged, or refused with a null pointer, which
// the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if refuse(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if refuse(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if refuse(new_size) {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Bounded = Bounded;

fn base_cases() -> u32 {
    match std::env::var("TANDEM_FUZZ_CASES") {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            panic!("TANDEM_FUZZ_CASES={v:?}: expected a whole number of cases")
        }),
        Err(_) => DEFAULT_CASES,
    }
}

/// The run's base seed: `TANDEM_FUZZ_SEED` (decimal or 0x-hex), else from the clock.
fn base_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| match std::env::var("TANDEM_FUZZ_SEED") {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => v.parse().ok(),
            };
            parsed.unwrap_or_else(|| panic!("TANDEM_FUZZ_SEED={v:?}: expected a number"))
        }
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ (u64::from(std::process::id()) << 32)
        }
    })
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .to_path_buf()
}

/// One line per target, on stderr and in `target/fuzz-summary.txt` (truncated by the first
/// target of this process to finish).
fn summary(line: &str) {
    eprintln!("{line}");
    static FILE: OnceLock<Mutex<Option<std::fs::File>>> = OnceLock::new();
    let f = FILE.get_or_init(|| {
        Mutex::new(std::fs::File::create(target_dir().join("fuzz-summary.txt")).ok())
    });
    if let Some(f) = f.lock().unwrap().as_mut() {
        let _ = writeln!(f, "{line}");
    }
}

/// The input of one case: named files, written into a fresh directory for the check.
#[derive(Clone, Default)]
struct Case {
    files: Vec<(String, Vec<u8>)>,
}

impl Case {
    fn new() -> Self {
        Case::default()
    }
    fn file(mut self, name: &str, bytes: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.to_string(), bytes.into()));
        self
    }
    fn params(self, v: Value) -> Self {
        self.file("params.json", v.to_string())
    }
    fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, bytes) in &self.files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, bytes) in &self.files {
            let text = String::from_utf8_lossy(bytes);
            let shown: String = text.escape_debug().take(3000).collect();
            let more = if shown.len() < text.escape_debug().count() {
                " …"
            } else {
                ""
            };
            writeln!(f, "--- {name} ({} bytes): \"{shown}\"{more}", bytes.len())?;
        }
        Ok(())
    }
}

/// What a case directory's `params.json` says (`null` without one).
fn params(dir: &Path) -> Value {
    std::fs::read(dir.join("params.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

fn param_usize(p: &Value, key: &str, default: usize) -> usize {
    p[key]
        .as_u64()
        .map(|v| usize::try_from(v).unwrap_or(usize::MAX))
        .unwrap_or(default)
}

/// The first of `names` present in `dir`.
fn find_file(dir: &Path, names: &[&str]) -> Result<PathBuf, String> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("the case has none of {names:?}"))
}

/// Lines of a file as [`tandem::data::finetune`] and the corpus reader count them (an upper
/// bound on any line number an error may give).
fn line_count(bytes: &[u8]) -> u64 {
    bytes.split(|b| *b == b'\n').count() as u64
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn regression_cases(target: &str) -> Vec<PathBuf> {
    let root = repo().join("tests/fuzz").join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|it| {
            it.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

#[derive(Default)]
struct Progress {
    since: Option<Instant>,
    what: String,
}

/// Runs one target: its regression cases, then `weight` × [`base_cases`] random cases, on a
/// thread watched for hangs. `setup` runs on that thread and gives the strategy and the check
/// (which reads the case's files from the directory it is given).
fn run_target<S, F>(
    name: &'static str,
    weight: f64,
    setup: impl FnOnce() -> (S, F) + Send + 'static,
) where
    S: Strategy<Value = Case>,
    F: Fn(&Path) -> Result<(), String>,
{
    // Panics on the runner threads are caught and reported with their input (by proptest, or
    // below for regression cases): printing each one, shrinking included, would bury that.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let runner = thread::current()
                .name()
                .is_some_and(|n| n.starts_with("fuzz-"));
            if !runner || std::env::var_os("TANDEM_FUZZ_VERBOSE").is_some() {
                default(info);
            }
        }));
    });
    let start = Instant::now();
    let base = base_cases();
    let cases = if base == 0 {
        0
    } else {
        ((f64::from(base) * weight).round() as u32).max(1)
    };
    let seed = base_seed() ^ fnv(name);
    let root = std::env::temp_dir().join(format!("tandem-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let progress = Arc::new(Mutex::new(Progress::default()));
    let (tx, rx) = mpsc::channel();
    let runner = {
        let (progress, root) = (progress.clone(), root.clone());
        thread::Builder::new()
            .name(format!("fuzz-{name}"))
            .spawn(move || {
                TARGET.set(name);
                ROOT.set(root.clone());
                let begin = |what: String| {
                    let mut p = progress.lock().unwrap();
                    p.since = Some(Instant::now());
                    p.what = what;
                };
                let end = || progress.lock().unwrap().since = None;
                let result = (|| -> Result<(usize, u64), String> {
                    let (strategy, check) = setup();
                    let mut replayed = 0;
                    for case in regression_cases(name) {
                        let dir = root.join(format!("replay-{replayed}"));
                        copy_dir(&case, &dir);
                        begin(format!("regression case {}", case.display()));
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            check(&dir)
                        }))
                        .unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(&*p))));
                        end();
                        r.map_err(|e| format!("regression case {}: {e}", case.display()))?;
                        let _ = std::fs::remove_dir_all(&dir);
                        replayed += 1;
                    }
                    ACCEPTED.set(0);
                    if cases == 0 {
                        return Ok((replayed, 0));
                    }
                    let config = ProptestConfig {
                        cases,
                        failure_persistence: None,
                        rng_seed: RngSeed::Fixed(seed),
                        max_shrink_time: 120_000,
                        max_shrink_iters: 2_000,
                        ..ProptestConfig::default()
                    };
                    let n = AtomicUsize::new(0);
                    TestRunner::new(config)
                        .run(&strategy, |case| {
                            let dir = root.join(format!("case-{}", n.fetch_add(1, Ordering::Relaxed)));
                            begin(format!("{case:?}"));
                            case.write(&dir);
                            let r = check(&dir);
                            end();
                            let _ = std::fs::remove_dir_all(&dir);
                            r.map_err(TestCaseError::fail)
                        })
                        .map_err(|e| match e {
                            TestError::Abort(why) => format!("aborted: {why}"),
                            TestError::Fail(why, case) => {
                                let saved = target_dir().join("fuzz-failures").join(name);
                                let _ = std::fs::remove_dir_all(&saved);
                                case.write(&saved);
                                format!(
                                    "{why}\nminimal failing input (saved to {}; copy that directory \
                                     to tests/fuzz/{name}/<case>/ to keep it as a regression case):\n{case:?}",
                                    saved.display()
                                )
                            }
                        })?;
                    Ok((replayed, ACCEPTED.get()))
                })();
                let _ = tx.send(result);
            })
            .unwrap()
    };
    let result = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let p = progress.lock().unwrap();
                if let Some(since) = p.since.filter(|s| s.elapsed() > CASE_LIMIT) {
                    panic!(
                        "fuzz {name}: a case has run for {:?} (a hang?); TANDEM_FUZZ_SEED={} \
                         reproduces the run. The input:\n{}",
                        since.elapsed(),
                        base_seed(),
                        p.what
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let e = runner.join().err().map(|p| panic_text(&*p));
                panic!("fuzz {name}: the runner thread died: {e:?}");
            }
        }
    };
    let _ = runner.join();
    let (replayed, accepted) = result.unwrap_or_else(|e| {
        panic!(
            "fuzz {name} (TANDEM_FUZZ_SEED={} reproduces the run): {e}",
            base_seed()
        )
    });
    let _ = std::fs::remove_dir_all(&root);
    summary(&format!(
        "fuzz {name:<16} {replayed:>2} regression case(s) + {cases:>5} random cases ({accepted:>5} \
         accepted) in {:>5.1} s (TANDEM_FUZZ_SEED={})",
        start.elapsed().as_secs_f64(),
        base_seed()
    ));
}

// ------------------------------------------------------------------------------------------
// Generators: mutations of valid seeds, noise, and JSON / TOML built from known keys.

/// Byte strings that tend to matter to parsers: separators, escapes, edge numbers, BOMs,
/// invalid UTF-8, path tricks and the formats' own keywords.
const DICT: &[&[u8]] = &[
    b"\xef\xbb\xbf",
    b"\r\n",
    b"\n",
    b"\n\n",
    b"\r",
    b"\t",
    b"\0",
    b" ",
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"=",
    b"null",
    b"true",
    b"false",
    b"-1",
    b"0",
    b"1",
    b"-0",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"NaN",
    b"nan",
    b"inf",
    b"-inf",
    b"1.5",
    b"4294967295",
    b"4294967296",
    b"9223372036854775807",
    b"9223372036854775808",
    b"18446744073709551615",
    b"18446744073709551616",
    b"99999999999999999999999999",
    b"\"\"",
    b"[]",
    b"{}",
    b"../",
    b"../../etc/passwd",
    b"/",
    b"\xc3\xa9",
    b"\xf4\x8f\xbf\xbf",
    b"\xe2\x80\x8b",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\\u0000",
    b"\\ud800",
    b"\\n",
    b"[UNK]",
    b"[CLS]",
    b"[SEP]",
    b"[PAD]",
    b"[MASK]",
    b"##",
    b"-DOCSTART-",
    b"B-PER",
    b"\"text\"",
    b"\"text_a\"",
    b"\"text_b\"",
    b"\"label\"",
    b"\"id\"",
    b"text\tlabel",
];

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Byte(usize, u8),
    Insert(usize, Vec<u8>),
    Token(usize, usize),
    Replace(usize, usize),
    Delete(usize, usize),
    Duplicate(usize, usize, usize),
    Truncate(usize),
}

fn mutation(tokens: usize) -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => (any::<usize>(), 0u8..8).prop_map(|(a, b)| Mutation::Flip(a, b)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::Byte(a, b)),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..12))
            .prop_map(|(a, b)| Mutation::Insert(a, b)),
        3 => (any::<usize>(), 0..tokens).prop_map(|(a, t)| Mutation::Token(a, t)),
        4 => (any::<usize>(), 0..tokens).prop_map(|(a, t)| Mutation::Replace(a, t)),
        2 => (any::<usize>(), 1usize..48).prop_map(|(a, n)| Mutation::Delete(a, n)),
        1 => (any::<usize>(), 1usize..48, any::<usize>())
            .prop_map(|(a, n, to)| Mutation::Duplicate(a, n, to)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn is_delimiter(b: u8) -> bool {
    b" \t\r\n,:;{}[]=\"'".contains(&b)
}

fn apply(b: &mut Vec<u8>, m: &Mutation, dict: &[&[u8]]) {
    let len = b.len();
    let at = |a: usize| a % (len + 1);
    match m {
        Mutation::Flip(a, bit) if len > 0 => b[a % len] ^= 1 << bit,
        Mutation::Byte(a, v) if len > 0 => b[a % len] = *v,
        Mutation::Insert(a, s) => {
            let i = at(*a);
            b.splice(i..i, s.iter().copied());
        }
        Mutation::Token(a, t) => {
            let i = at(*a);
            b.splice(i..i, dict[t % dict.len()].iter().copied());
        }
        Mutation::Replace(a, t) if len > 0 => {
            // The run of non-delimiters around the position: a number, a word, a value.
            let i = a % len;
            let mut s = i;
            while s > 0 && !is_delimiter(b[s - 1]) {
                s -= 1;
            }
            let mut e = i;
            while e < len && !is_delimiter(b[e]) {
                e += 1;
            }
            b.splice(s..e, dict[t % dict.len()].iter().copied());
        }
        Mutation::Delete(a, n) if len > 0 => {
            let i = a % len;
            b.drain(i..(i + n).min(len));
        }
        Mutation::Duplicate(a, n, to) if len > 0 => {
            let i = a % len;
            let piece = b[i..(i + n).min(len)].to_vec();
            let j = at(*to);
            b.splice(j..j, piece);
        }
        Mutation::Truncate(a) => b.truncate(at(*a)),
        _ => {}
    }
}

/// One of `seeds`, mutated 1–7 times with [`DICT`] and `extra`.
fn mutated(seeds: Vec<Vec<u8>>, extra: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
    assert!(!seeds.is_empty());
    let seeds = Arc::new(seeds);
    let dict: Arc<Vec<&'static [u8]>> = Arc::new(DICT.iter().chain(extra).copied().collect());
    (
        0..seeds.len(),
        // Mostly one or two mutations, so that much of the input stays well-formed.
        prop_oneof![
            3 => prop::collection::vec(mutation(dict.len()), 1..3),
            1 => prop::collection::vec(mutation(dict.len()), 3..8),
        ],
    )
        .prop_map(move |(i, muts)| {
            let mut b = seeds[i].clone();
            for m in &muts {
                apply(&mut b, m, &dict);
            }
            b
        })
}

fn noise() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..300)
}

/// Strings of dictionary pieces and short words: structured noise for line formats.
fn token_soup(extra: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
    let dict: Vec<&'static [u8]> = DICT.iter().chain(extra).copied().collect();
    let n = dict.len();
    prop::collection::vec(
        prop_oneof![
            3 => (0..n).prop_map(move |i| dict[i].to_vec()),
            2 => "[a-zA-Z0-9 ]{1,8}".prop_map(String::into_bytes),
            1 => "\\PC{1,4}".prop_map(String::into_bytes),
        ],
        0..40,
    )
    .prop_map(|parts| parts.concat())
}

const INTS: &[i64] = &[
    0,
    1,
    2,
    3,
    -1,
    -2,
    7,
    16,
    40,
    64,
    255,
    256,
    65535,
    65536,
    i32::MAX as i64,
    u32::MAX as i64,
    1 << 40,
    i64::MAX,
    i64::MIN,
];
const FLOATS: &[f64] = &[
    0.0, -0.0, 0.1, 0.5, 1.0, -1.0, 1.5, 1e-12, 1e-320, 1e300, -1e300, 3.4e38, 1e39, 0.999_999,
];
const STRINGS: &[&str] = &[
    "",
    " ",
    "x",
    "gelu",
    "relu",
    "bert",
    "absolute",
    "relative_key",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertForPreTraining",
    "BertTokenizer",
    "PreTrainedTokenizerFast",
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "##s",
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    "a/b",
    "é",
    "\u{0}",
    "\u{feff}",
    "\u{10ffff}",
    "\u{200b}",
    "日本語",
    "pos",
    "neg",
    "B-PER",
    "O",
];

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        3 => prop::sample::select(INTS).prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        1 => any::<i64>().prop_map(Value::from),
        2 => prop::sample::select(FLOATS).prop_map(|f| json!(f)),
        3 => prop::sample::select(STRINGS).prop_map(Value::from),
        1 => "\\PC{0,10}".prop_map(Value::from),
    ]
}

/// Random JSON: leaves from [`json_leaf`], objects keyed by `keys`.
fn json_value(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 5, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(keys), inner), 0..5).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// `base` with a few keys (of `keys`) set to random values or removed.
fn json_edits(base: Value, keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop::collection::vec(
        (
            prop::sample::select(keys),
            prop::option::weighted(0.85, json_value(keys)),
        ),
        0..5,
    )
    .prop_map(move |edits| {
        let mut v = base.clone();
        let obj = v.as_object_mut().expect("an object");
        for (k, val) in edits {
            match val {
                Some(val) => obj.insert(k.to_string(), val),
                None => obj.remove(k),
            };
        }
        v
    })
}

fn read_seed(rel: &str, max: usize) -> Vec<u8> {
    let mut b = std::fs::read(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    if b.len() > max {
        // Cut at a line end, so that the seed itself is mostly well-formed.
        let cut = b[..max]
            .iter()
            .rposition(|c| *c == b'\n')
            .map_or(max, |i| i + 1);
        b.truncate(cut);
    }
    b
}

/// The 40 ids of the round-trip fixtures' vocabulary (as in tests/predict.rs).
const VOCAB: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "the", "a", "cat", "dog", "sat",
    "on", "mat", "john", "smith", "lives", "in", "paris", "london", "where", "does", "who", "is",
    "what", "good", "bad", "movie", "was", "very", "and", "works", "at", "google", "today", "went",
    "to", "##s", "ok",
];

/// A WordPiece tokenizer over [`VOCAB`], loaded from a `vocab.txt` in `dir`.
fn small_tokenizer(dir: &Path) -> Tokenizer {
    let d = dir.join("small-tokenizer");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("vocab.txt"), VOCAB.join("\n") + "\n").unwrap();
    Tokenizer::load(&d).unwrap()
}

/// A fresh directory for a target's setup, inside its temporary directory.
fn scratch(name: &str) -> PathBuf {
    let d = ROOT.with_borrow(|r| r.join(format!("setup-{name}")));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sha256_hex(b: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(b))
}

/// `text` with every `from` replaced by `to`, on bytes (the text need not be UTF-8).
fn replace_bytes(text: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// Corpus files and the shard index.

const CORPUS_DICT: &[&[u8]] = &[
    b"{\"text\": \"",
    b"\"}",
    b"{\"text\": 5}",
    b"{\"text\": \"a\\nb\"}",
];

fn corpus_seeds() -> Vec<Vec<u8>> {
    let en = read_seed("configs/data/corpus/en.txt", 1500);
    let ko = read_seed("configs/data/corpus/ko.txt", 1200);
    let text = String::from_utf8_lossy(&en).into_owned();
    let jsonl: String = text
        .split("\n\n")
        .map(|d| json!({ "text": d }).to_string() + "\n")
        .collect();
    vec![en, ko, jsonl.into_bytes(), b"a\n\nb\n\nc d\n".to_vec()]
}

#[test]
fn corpus() {
    run_target("corpus", 3.0, || {
        let bytes = prop_oneof![
            6 => mutated(corpus_seeds(), CORPUS_DICT),
            1 => noise(),
            2 => token_soup(CORPUS_DICT),
        ];
        let strategy = (
            bytes,
            any::<bool>(),
            prop::sample::select(vec![0usize, 1, 3, 8, 64, 4096, 1 << 20]),
            any::<bool>(),
            1u64..2048,
        )
            .prop_map(|(bytes, jsonl, max, skip, shard)| {
                Case::new()
                    .file(if jsonl { "input.jsonl" } else { "input.txt" }, bytes)
                    .params(json!({ "max_line_bytes": max, "skip": skip, "shard_bytes": shard }))
            });
        (strategy, check_corpus)
    });
}

/// Parsing a buffer and streaming the file give the same documents or the same error at the
/// same line; the shard scan agrees, and its shards parse back into exactly those documents.
fn check_corpus(dir: &Path) -> Result<(), String> {
    let p = params(dir);
    let file = find_file(dir, &["input.txt", "input.jsonl"])?;
    let bytes = std::fs::read(&file).unwrap();
    let opts = CorpusOptions {
        max_line_bytes: param_usize(&p, "max_line_bytes", 1 << 20),
        on_error: if p["skip"] == true {
            ErrorPolicy::Skip
        } else {
            ErrorPolicy::Fail
        },
    };
    let lines = line_count(&bytes);
    let parsed = parse_documents(&bytes, Format::from_path(&file), &opts, "fuzz-origin");
    match &parsed {
        Ok(docs) => {
            accepted();
            for d in docs {
                ensure!(!d.is_empty(), "an empty document");
                for s in d {
                    ensure!(
                        !s.is_empty() && s.trim() == s && !s.contains('\n'),
                        "sentence {s:?} is not one trimmed, non-empty line"
                    );
                }
            }
        }
        Err(Error::Corpus { origin, line, msg }) => {
            ensure!(origin == "fuzz-origin", "error names {origin:?}");
            ensure!(
                (1..=lines).contains(line) && !msg.is_empty(),
                "error at line {line} of {lines}: {msg:?}"
            );
        }
        Err(e) => return Err(format!("an error that names no line: {e}")),
    }
    let streamed: Result<Vec<Document>, Error> =
        DocumentReader::new(vec![file.clone()], opts.clone()).collect();
    match (&parsed, &streamed) {
        (Ok(a), Ok(b)) => ensure!(a == b, "parse and stream differ:\n{a:?}\n{b:?}"),
        (
            Err(Error::Corpus { line, msg, .. }),
            Err(Error::Corpus {
                origin,
                line: l2,
                msg: m2,
            }),
        ) => {
            ensure!(
                line == l2 && msg == m2 && *origin == file.display().to_string(),
                "parse and stream fail differently: line {line} {msg:?} vs {origin}:{l2} {m2:?}"
            );
        }
        (a, b) => return Err(format!("parse and stream disagree: {a:?} vs {b:?}")),
    }
    let shard_bytes = p["shard_bytes"].as_u64().unwrap_or(64);
    let built = build_index(std::slice::from_ref(&file), shard_bytes, &opts);
    match (&parsed, built) {
        (Err(Error::Corpus { line, .. }), Err(Error::Corpus { line: l2, .. })) => {
            ensure!(*line == l2, "parse fails at line {line}, the scan at {l2}");
        }
        (Err(e), other) => {
            return Err(format!(
                "parse fails ({e}) but the scan gives {:?}",
                other.map(|i| i.shards.len())
            ))
        }
        (Ok(docs), Err(e)) => {
            ensure!(
                docs.len() < 2 && matches!(e, Error::Data(_)),
                "{} documents parse but the scan fails: {e}",
                docs.len()
            );
        }
        (Ok(docs), Ok(index)) => {
            ensure!(docs.len() >= 2, "an index of {} document(s)", docs.len());
            let mut all = Vec::new();
            for s in &index.shards {
                ensure!(
                    s.documents >= 2,
                    "shard {} holds {} document(s)",
                    s.id,
                    s.documents
                );
                let d = index
                    .shard_documents(s.id)
                    .map_err(|e| format!("shard {}: {e}", s.id))?;
                ensure!(d.len() as u64 == s.documents, "shard {} count", s.id);
                all.extend(d);
            }
            ensure!(&all == docs, "the shards' documents differ from the file's");
            let saved = dir.join("index.json");
            index.save(&saved).map_err(|e| e.to_string())?;
            let back = ShardIndex::load(&saved).map_err(|e| format!("reloading: {e}"))?;
            ensure!(back == index, "the index does not survive save and load");
        }
    }
    Ok(())
}

const SHARD_DICT: &[&[u8]] = &[b"\"text\"", b"\"jsonl\"", b"$DIR/corpus.txt", b"$DIR/../x"];

const SHARD_CORPUS: &str = "one two.\nthree four.\n\nfive six.\n\nseven.\neight nine.\n\nten.\n\n\
    eleven twelve.\n\nthirteen.\n\nfourteen fifteen.\nsixteen.\n\nseventeen.\n";

/// Numbers for the fields of a hand-made index.
fn index_number() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0u64..200,
        1 => prop::sample::select(vec![
            u64::MAX,
            u64::MAX - 1,
            1 << 63,
            (1 << 63) + 1,
            u64::from(u32::MAX),
            1 << 40,
            SHARD_CORPUS.len() as u64,
        ]),
    ]
}

/// A whole index drawn field by field: ranges, sizes and counts that need not agree.
fn hand_made_index() -> impl Strategy<Value = Vec<u8>> {
    let range = (0u64..3, index_number(), index_number(), index_number()).prop_map(
        |(file, start, end, first_line)| {
            json!({ "file": file, "start": start, "end": end, "first_line": first_line })
        },
    );
    let shard = (
        prop::collection::vec(range, 0..4),
        index_number(),
        index_number(),
    );
    (
        prop::collection::vec(shard, 0..4),
        index_number(),
        prop::sample::select(vec![0usize, 1, 8, 1 << 20]),
        any::<bool>(),
    )
        .prop_map(|(shards, size, max_line, wrap)| {
            let shards: Vec<Value> = shards
                .into_iter()
                .enumerate()
                .map(|(i, (ranges, documents, bytes))| {
                    // Half the time `bytes` is the ranges' (wrapping) sum, as validation wants.
                    let sum = ranges.iter().fold(0u64, |s, r: &Value| {
                        let (a, b) = (r["start"].as_u64().unwrap(), r["end"].as_u64().unwrap());
                        s.wrapping_add(b.wrapping_sub(a))
                    });
                    json!({
                        "id": i, "ranges": ranges, "documents": documents,
                        "bytes": if wrap { sum } else { bytes },
                        "sha256": sha256_hex(b""),
                    })
                })
                .collect();
            json!({
                "version": 1,
                "target_shard_bytes": 64,
                "options": { "max_line_bytes": max_line, "on_error": "fail" },
                "files": [{
                    "path": "$DIR/corpus.txt", "format": "text", "size": size,
                    "sha256": sha256_hex(SHARD_CORPUS.as_bytes()),
                }],
                "shards": shards,
                "stats": { "documents": 0, "sentences": 0, "skipped_lines": 0, "skipped_records": 0 },
            })
            .to_string()
            .into_bytes()
        })
}

#[test]
fn shard_index() {
    run_target("shard_index", 1.0, || {
        let dir = scratch("shard-index");
        let corpus = dir.join("corpus.txt");
        std::fs::write(&corpus, SHARD_CORPUS).unwrap();
        let index =
            build_index(std::slice::from_ref(&corpus), 24, &CorpusOptions::default()).unwrap();
        assert!(index.shards.len() >= 2);
        let shard0 = index.read_shard(0).unwrap();
        let text = serde_json::to_string_pretty(&index).unwrap();
        let text = text.replace(&dir.display().to_string(), "$DIR");
        let strategy = (
            prop_oneof![
                3 => mutated(vec![text.into_bytes()], SHARD_DICT),
                2 => hand_made_index(),
            ],
            prop_oneof![
                2 => mutated(vec![shard0], &[]),
                1 => noise(),
            ],
            0u32..6,
        )
            .prop_map(|(index, shard, id)| {
                Case::new()
                    .file("corpus.txt", SHARD_CORPUS)
                    .file("index.json", index)
                    .file("shard.bin", shard)
                    .params(json!({ "id": id }))
            });
        (strategy, check_shard_index)
    });
}

/// A loaded index is valid and names itself when it is not; shards read and parse without
/// panicking; and the index as a worker receives it (not validated) parses any bytes whose
/// checksum it is given without panicking.
fn check_shard_index(dir: &Path) -> Result<(), String> {
    let raw = std::fs::read(dir.join("index.json")).unwrap();
    let resolved = replace_bytes(&raw, b"$DIR", dir.display().to_string().as_bytes());
    let path = dir.join("index.resolved.json");
    std::fs::write(&path, &resolved).unwrap();
    let shard = std::fs::read(dir.join("shard.bin")).unwrap();
    let id = param_usize(&params(dir), "id", 0) as u32;
    match ShardIndex::load(&path) {
        Err(e) => ensure!(
            e.to_string().contains(&path.display().to_string()),
            "the error does not name the index file: {e}"
        ),
        Ok(ix) => {
            accepted();
            for id in [id, 0, 1, ix.shards.len() as u32] {
                if let Ok(bytes) = ix.read_shard(id) {
                    let _ = ix.parse_shard(id, &bytes);
                }
                let _ = ix.parse_shard(id, &shard);
            }
        }
    }
    if let Ok(ix) = serde_json::from_slice::<ShardIndex>(&resolved) {
        for spec in ix.shards.iter().take(4) {
            let _ = ix.parse_shard(spec.id, &shard);
            let mut s = spec.clone();
            s.bytes = shard.len() as u64;
            s.sha256 = sha256_hex(&shard);
            let _ = parse_shard(&ix.files, &s, &shard, &ix.options);
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// HF config.json, safetensors weights, checkpoint files.

const CONFIG_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "pad_token_id",
    "position_embedding_type",
    "model_type",
    "architectures",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "text_pairs",
    "version_2_with_negative",
    "0",
    "1",
    "2",
];

/// The round-trip fixtures' sizes: a config with these loads against their weights.
fn roundtrip_config(kind: &str) -> Value {
    serde_json::from_slice(
        &std::fs::read(
            repo()
                .join("tests/fixtures/roundtrip")
                .join(kind)
                .join("config.json"),
        )
        .unwrap(),
    )
    .unwrap()
}

#[test]
fn hf_config() {
    run_target("hf_config", 1.5, || {
        let seeds: Vec<Vec<u8>> = [
            "tests/fixtures/bert_tiny/config.json",
            "tests/fixtures/seqcls_tiny/config.json",
            "tests/fixtures/tokcls_tiny/config.json",
            "tests/fixtures/qa_tiny/config.json",
            "tests/fixtures/roundtrip/seqcls/config.json",
        ]
        .iter()
        .map(|p| read_seed(p, 1 << 20))
        .collect();
        let base = prop::sample::select(vec!["seqcls", "tokcls", "qa"]).prop_map(roundtrip_config);
        let structured = base
            .prop_flat_map(|b| json_edits(b, CONFIG_KEYS))
            .prop_map(|v| v.to_string().into_bytes());
        let strategy = prop_oneof![
            2 => mutated(seeds, &[]),
            3 => structured,
        ]
        .prop_map(|b| Case::new().file("config.json", b));
        let vocab = VOCAB.join("\n") + "\n";
        let weights: HashMap<&str, Vec<u8>> = ["seqcls", "tokcls", "qa"]
            .iter()
            .map(|k| {
                let p = repo()
                    .join("tests/fixtures/roundtrip")
                    .join(k)
                    .join("model.safetensors");
                (*k, std::fs::read(p).unwrap())
            })
            .collect();
        let check = move |dir: &Path| check_hf_config(dir, &weights, &vocab);
        (strategy, check)
    });
}

/// A config loads or names its file; one that loads validates, survives `save` and `load`, and
/// (when it fits the round-trip fixtures' weights) loads as a predictor or fails cleanly.
fn check_hf_config(
    dir: &Path,
    weights: &HashMap<&str, Vec<u8>>,
    vocab: &str,
) -> Result<(), String> {
    let path = dir.join("config.json");
    let cfg = match BertConfig::load(&path) {
        Err(e) => {
            ensure!(
                e.to_string().contains(&path.display().to_string()),
                "the error does not name the file: {e}"
            );
            return Ok(());
        }
        Ok(cfg) => cfg,
    };
    accepted();
    cfg.validate()
        .map_err(|e| format!("loaded but invalid: {e}"))?;
    let again = dir.join("saved.json");
    cfg.save(&again, "BertForPreTraining")
        .map_err(|e| e.to_string())?;
    let back = BertConfig::load(&again).map_err(|e| format!("does not load once saved: {e}"))?;
    let mut same = cfg.clone();
    same.extra = back.extra.clone();
    ensure!(same == back, "save and load change it:\n{cfg:?}\n{back:?}");
    let head = TaskHead::from_config(&cfg);
    let fits = |kind: &str| {
        let f = roundtrip_config(kind);
        CONFIG_KEYS[..8]
            .iter()
            .all(|k| serde_json::to_value(&cfg).unwrap()[*k] == f[*k])
    };
    // Only configs of the fixtures' sizes, and a head of at most a few thousand labels: a
    // config that declares a larger model is allocated before the weights are compared.
    let kind = match head {
        Ok(TaskHead::SequenceClassification { num_labels }) if num_labels <= 4096 => "seqcls",
        Ok(TaskHead::TokenClassification { num_labels }) if num_labels <= 4096 => "tokcls",
        Ok(TaskHead::QuestionAnswering) => "qa",
        _ => return Ok(()),
    };
    if !fits(kind) {
        return Ok(());
    }
    std::fs::write(dir.join("model.safetensors"), &weights[kind]).unwrap();
    std::fs::write(dir.join("vocab.txt"), vocab).unwrap();
    let _ = std::fs::remove_file(&again);
    if let Err(e) = Predictor::load(dir, &Device::Cpu) {
        let s = e.to_string();
        ensure!(
            s.contains(&dir.display().to_string())
                || s.contains("config")
                || matches!(e, Error::ShapeMismatch { .. }),
            "the error does not say where: {e}"
        );
    }
    Ok(())
}

/// A small BERT whose store the weight targets load into.
fn small_model() -> PretrainModel {
    let mut cfg = BertConfig::new(40, 8, 1, 2, 16);
    cfg.max_position_embeddings = 16;
    PretrainModel::new(&cfg, 3, &Device::Cpu).unwrap()
}

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
    "F8_E4M3", "F8_E5M2", "F4", "XX", "",
];

/// A safetensors file drawn field by field: header length, dtypes, shapes, offsets.
fn hand_made_safetensors(names: Vec<String>) -> impl Strategy<Value = Vec<u8>> {
    let dim = prop_oneof![
        4 => 0usize..10,
        1 => prop::sample::select(vec![usize::MAX, 1 << 32, 1 << 62, 1 << 31, 65536]),
    ];
    let offset = prop_oneof![
        4 => 0u64..400,
        1 => prop::sample::select(vec![u64::MAX, 1 << 63, 1 << 32]),
    ];
    let entry = (
        prop::sample::select(names),
        prop::sample::select(DTYPES),
        prop::collection::vec(dim, 0..4),
        offset.clone(),
        offset,
        any::<bool>(),
    );
    (
        prop::collection::vec(entry, 0..5),
        prop::option::of(prop_oneof![
            Just(json!({ "format": "pt" })),
            Just(json!({ "format": 5 })),
            Just(json!("x")),
        ]),
        prop::collection::vec(any::<u8>(), 0..400),
        prop::option::weighted(0.2, any::<u64>()),
    )
        .prop_map(|(entries, meta, data, len_field)| {
            let mut header = serde_json::Map::new();
            let mut at = 0u64;
            for (name, dtype, shape, a, b, consistent) in entries {
                let size = match dtype {
                    "F64" | "I64" | "U64" => 8,
                    "F32" | "I32" | "U32" => 4,
                    "F16" | "BF16" | "I16" | "U16" => 2,
                    _ => 1,
                };
                let n = shape
                    .iter()
                    .fold(size as u64, |n, d| n.wrapping_mul(*d as u64));
                let offsets = if consistent {
                    [at, at.wrapping_add(n)]
                } else {
                    [a, b]
                };
                at = offsets[1];
                header.insert(
                    name,
                    json!({ "dtype": dtype, "shape": shape, "data_offsets": offsets }),
                );
            }
            if let Some(m) = meta {
                header.insert("__metadata__".into(), m);
            }
            let h = Value::Object(header).to_string().into_bytes();
            let mut out = len_field.unwrap_or(h.len() as u64).to_le_bytes().to_vec();
            out.extend(h);
            out.extend(data);
            out
        })
}

const SHARD_NAMES: &[&str] = &[
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors",
    "../outside.safetensors",
    "../../outside.safetensors",
    "./model-00001-of-00002.safetensors",
    "sub/model.safetensors",
    "/etc/passwd",
    "",
    ".",
    "..",
    "missing.safetensors",
];

#[test]
fn safetensors() {
    run_target("safetensors", 1.5, || {
        let dir = scratch("safetensors");
        let model = small_model();
        let tensors = model.store.tensors();
        let names: Vec<String> = tensors.keys().cloned().collect();
        let whole = safetensors_bytes(&tensors).unwrap();
        let half: BTreeMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(DType::F16).unwrap()))
            .collect();
        let half = safetensors_bytes(&half).unwrap();
        let (a, b): (Vec<_>, Vec<_>) = tensors
            .into_iter()
            .enumerate()
            .partition(|(i, _)| i % 2 == 0);
        let part = |v: Vec<(usize, (String, Tensor))>| {
            safetensors_bytes(&v.into_iter().map(|(_, kv)| kv).collect()).unwrap()
        };
        let (first, second) = (part(a), part(b));
        let single = prop_oneof![
            3 => mutated(vec![whole.clone(), half], &[]),
            2 => hand_made_safetensors(names.iter().cloned().chain(["x".into(), "__metadata__".into()]).collect()),
            1 => noise(),
        ]
        .prop_map(|b| Case::new().file("model.safetensors", b));
        let map_entry = (
            prop::sample::select(names.clone()),
            prop::sample::select(SHARD_NAMES),
        );
        let index = prop_oneof![
            2 => prop::collection::vec(map_entry, 0..8).prop_map(|m| {
                let map: serde_json::Map<String, Value> =
                    m.into_iter().map(|(k, v)| (k, Value::from(v))).collect();
                json!({ "metadata": {}, "weight_map": map }).to_string().into_bytes()
            }),
            1 => json_value(&["weight_map", "metadata", "model-00001-of-00002.safetensors"])
                .prop_map(|v| v.to_string().into_bytes()),
        ];
        let sharded = (index, prop::option::of(mutated(vec![first.clone()], &[]))).prop_map(
            move |(index, m)| {
                Case::new()
                    .file("model.safetensors.index.json", index)
                    .file(
                        "model-00001-of-00002.safetensors",
                        m.unwrap_or_else(|| first.clone()),
                    )
                    .file("model-00002-of-00002.safetensors", second.clone())
            },
        );
        let strategy = prop_oneof![3 => single, 2 => sharded];
        let check = move |case: &Path| {
            // A valid checkpoint beside the case directory, for a traversing entry to reach.
            let outside = case.parent().unwrap().join("outside.safetensors");
            if !outside.exists() {
                std::fs::write(&outside, &whole).unwrap();
            }
            let _ = &dir;
            check_safetensors(case, &model.store)
        };
        (strategy, check)
    });
}

/// Bytes decode or fail naming their origin; a directory reads only its own files (a sharded
/// index's entries are file names in it), and what it reads loads into a store or fails.
fn check_safetensors(dir: &Path, store: &ParamStore) -> Result<(), String> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        let bytes = std::fs::read(&single).unwrap();
        match tensors_from_bytes(&bytes, "model.safetensors") {
            Err(e) => ensure!(
                e.to_string().contains("model.safetensors"),
                "the error does not name the file: {e}"
            ),
            Ok(t) => {
                accepted();
                let _ = load_weights(store, t, &single, 0.02, 0);
            }
        }
    }
    let index = dir.join("model.safetensors.index.json");
    let escapes = !single.is_file()
        && std::fs::read(&index)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["weight_map"].as_object().cloned())
            .is_some_and(|m| {
                m.values().filter_map(Value::as_str).any(|f| {
                    let p = Path::new(f);
                    p.components().count() != 1
                        || !matches!(p.components().next(), Some(std::path::Component::Normal(_)))
                })
            });
    match read_tensors(dir) {
        Err(e) => ensure!(
            e.to_string().contains(&dir.display().to_string()),
            "the error does not name the directory or file: {e}"
        ),
        Ok(t) => {
            if !single.is_file() {
                accepted();
            }
            ensure!(
                !escapes,
                "an index naming files outside the directory was followed"
            );
            let _ = load_weights(store, t, dir, 0.02, 0);
        }
    }
    Ok(())
}

const STATE_KEYS: &[&str] = &[
    "stage_index",
    "stage_name",
    "step",
    "total_steps",
    "initial_world_size",
    "world_size",
    "generation",
    "cursor",
    "ledger",
    "planned",
    "stage_done",
    "totals",
    "dev_metrics",
    "best",
    "optimizer_t",
    "epoch",
    "consumed",
    "bounds",
];
const CHECKPOINT_FILES: &[&str] = &[
    "model.safetensors",
    "config.json",
    "optimizer.safetensors",
    "trainer_state.json",
];

#[test]
fn checkpoint() {
    run_target("checkpoint", 0.5, || {
        let model = small_model();
        let mut adam = AdamW::new(AdamWConfig::default(), &model.store);
        for (i, (m, v)) in adam.m.iter_mut().zip(adam.v.iter_mut()).enumerate() {
            *m = (i % 7) as f32 * 0.1;
            *v = (i % 5) as f32 * 0.01;
        }
        adam.t = 9;
        let mut state = TrainerState::start(0, "pretrain", 2, 3);
        state.step = 9;
        state.total_steps = 20;
        let files = store_files(
            &model.store,
            model.cfg.to_hf_json("BertForPreTraining"),
            &adam,
            &state,
        )
        .unwrap();
        let files: Arc<BTreeMap<String, Vec<u8>>> = Arc::new(files.into_iter().collect());
        let specs: Vec<(String, Vec<usize>)> = (model.store.specs().iter())
            .map(|s| (s.name.clone(), s.shape.clone()))
            .collect();
        let with = |name: &'static str, bytes: Vec<u8>, files: &BTreeMap<String, Vec<u8>>| {
            let mut c = Case::new();
            for (k, v) in files {
                if k != name {
                    c = c.file(k, v.clone());
                }
            }
            if !bytes.is_empty() || name != "-" {
                c = c.file(name, bytes);
            }
            c
        };
        let state_json: Value = serde_json::from_slice(&files["trainer_state.json"]).unwrap();
        let f = files.clone();
        let mutate_one = (
            prop::sample::select(CHECKPOINT_FILES),
            prop::collection::vec(mutation(DICT.len()), 1..6),
        )
            .prop_map(move |(name, muts)| {
                let mut b = f[name].clone();
                for m in &muts {
                    apply(&mut b, m, DICT);
                }
                with(name, b, &f)
            });
        let f = files.clone();
        let drop_one = prop::sample::select(CHECKPOINT_FILES).prop_map(move |name| {
            let mut c = Case::new();
            for (k, v) in f.iter().filter(|(k, _)| k.as_str() != name) {
                c = c.file(k, v.clone());
            }
            c
        });
        let f = files.clone();
        let state = json_edits(state_json, STATE_KEYS)
            .prop_map(move |v| with("trainer_state.json", v.to_string().into_bytes(), &f));
        // Moment tensors of other shapes and dtypes than the parameters'.
        let f = files.clone();
        let shape = |s: Vec<usize>| {
            prop_oneof![
                3 => Just(s.clone()),
                1 => Just(vec![]),
                1 => Just(vec![s.iter().product::<usize>()]),
                1 => Just(s.iter().map(|d| d + 1).collect::<Vec<_>>()),
                1 => Just(s.iter().map(|d| d.saturating_sub(1)).collect::<Vec<_>>()),
                1 => prop::collection::vec(0usize..5, 0..3),
            ]
        };
        let moment = (0..specs.len())
            .prop_flat_map(move |i| (Just(specs[i].0.clone()), shape(specs[i].1.clone())));
        let optimizer = (prop::collection::vec(
            (
                moment,
                prop::sample::select(vec![
                    DType::F32,
                    DType::F16,
                    DType::BF16,
                    DType::U8,
                    DType::I64,
                ]),
                prop::sample::select(vec![".exp_avg", ".exp_avg_sq", ".other"]),
            ),
            1..4,
        ),)
            .prop_map(move |(edits,)| {
                let mut opt = tensors_from_bytes(&f["optimizer.safetensors"], "seed").unwrap();
                for ((name, shape), dtype, suffix) in edits {
                    let t = Tensor::ones(shape.as_slice(), dtype, &Device::Cpu).unwrap();
                    opt.insert(format!("{name}{suffix}"), t);
                }
                let bytes = safetensors_bytes(&opt.into_iter().collect()).unwrap();
                with("optimizer.safetensors", bytes, &f)
            });
        let strategy = prop_oneof![
            4 => mutate_one,
            1 => drop_one,
            2 => state,
            3 => optimizer,
        ];
        let check = move |dir: &Path| check_checkpoint(dir, &model.store);
        (strategy, check)
    });
}

/// Restoring from any files restores or fails naming the file (or the tensor) at fault.
fn check_checkpoint(dir: &Path, store: &ParamStore) -> Result<(), String> {
    let mut files = HashMap::new();
    for name in CHECKPOINT_FILES {
        if let Ok(b) = std::fs::read(dir.join(name)) {
            files.insert(name.to_string(), b);
        }
    }
    let mut adam = AdamW::new(AdamWConfig::default(), store);
    match restore_store(store, &mut adam, 0.02, &files) {
        Ok(_) => {
            accepted();
            ensure!(
                adam.m.len() == store.numel() && adam.v.len() == store.numel(),
                "restored moments of the wrong length"
            );
        }
        Err(e) => {
            let s = e.to_string();
            ensure!(
                CHECKPOINT_FILES.iter().any(|f| s.contains(f))
                    || matches!(e, Error::ShapeMismatch { .. }),
                "the error names no file: {s}"
            );
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Tokenizer directories.

const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "config.json",
];
const TOKENIZER_CONFIG_KEYS: &[&str] = &[
    "tokenizer_class",
    "do_lower_case",
    "strip_accents",
    "tokenize_chinese_chars",
    "pad_token",
    "unk_token",
    "cls_token",
    "sep_token",
    "mask_token",
    "model_max_length",
    "added_tokens_decoder",
    "content",
    "special",
    "single_word",
    "lstrip",
    "normalized",
    "0",
    "5",
    "40",
    "99999",
    "4294967296",
    "-1",
];
const SAMPLE_TEXTS: &[&str] = &[
    "The cat sat on the mat.",
    "",
    " ",
    "é\u{301}ÉCOLE naïve 日本語 テスト",
    "[CLS] [MASK] [SEP] [E1] ## ##s",
    "\u{0}\u{1}\u{7f}\u{200b}\u{feff}\u{10ffff}",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
];

#[test]
fn tokenizer() {
    run_target("tokenizer", 0.5, || {
        let fixtures = repo().join("tests/fixtures/hf_tokenizers");
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&fixtures)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for d in &dirs {
            // What transformers writes loads, as it is: the fuzz starts from valid inputs.
            check_tokenizer(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
            assert!(Tokenizer::load(d).is_ok(), "{}", d.display());
        }
        type Files = Vec<(String, Vec<u8>)>;
        let seeds: Arc<Vec<Files>> = Arc::new(
            dirs.iter()
                .map(|d| {
                    TOKENIZER_FILES
                        .iter()
                        .filter_map(|f| Some((f.to_string(), std::fs::read(d.join(f)).ok()?)))
                        .collect()
                })
                .collect(),
        );
        #[derive(Clone, Debug)]
        enum Edit {
            Mutate(Vec<Mutation>),
            Remove,
            Replace(Value),
        }
        let edit = prop_oneof![
            4 => prop::collection::vec(mutation(DICT.len()), 1..6).prop_map(Edit::Mutate),
            1 => Just(Edit::Remove),
            2 => json_value(TOKENIZER_CONFIG_KEYS).prop_map(Edit::Replace),
        ];
        let strategy = (
            0..seeds.len(),
            prop::collection::vec((prop::sample::select(TOKENIZER_FILES), edit), 1..3),
        )
            .prop_map(move |(i, edits)| {
                let mut files: BTreeMap<String, Vec<u8>> = seeds[i].iter().cloned().collect();
                for (name, e) in edits {
                    match e {
                        Edit::Remove => {
                            files.remove(name);
                        }
                        Edit::Replace(v) => {
                            files.insert(name.into(), v.to_string().into_bytes());
                        }
                        Edit::Mutate(muts) => {
                            let b = files.entry(name.into()).or_default();
                            for m in &muts {
                                apply(b, m, DICT);
                            }
                        }
                    }
                }
                let mut c = Case::new();
                for (k, v) in files {
                    c = c.file(&k, v);
                }
                c
            });
        (strategy, check_tokenizer)
    });
}

/// A directory loads or the error names it; a loaded tokenizer encodes anything into ids it
/// knows, and what the coordinator sends its workers (`to_json`) loads there the same.
fn check_tokenizer(dir: &Path) -> Result<(), String> {
    check_tokenizer_json(dir);
    let t = match Tokenizer::load(dir) {
        Err(e) => {
            ensure!(
                e.to_string().contains(&dir.display().to_string()),
                "the error does not name the directory or its file: {e}"
            );
            return Ok(());
        }
        Ok(t) => t,
    };
    accepted();
    for text in SAMPLE_TEXTS {
        if let Ok(ids) = t.encode(text) {
            for id in ids {
                ensure!(
                    (id as usize) < t.vocab_size(),
                    "{text:?} encodes to id {id}, past the vocabulary's {} tokens",
                    t.vocab_size()
                );
                ensure!(
                    t.id_to_token(id).is_some(),
                    "{text:?} encodes to unknown id {id}"
                );
            }
        }
        let _ = t.encode_with_specials(text);
    }
    // What the coordinator sends its workers: refused (naming the tokenizer), or a copy that
    // resolves the same special ids, has the same tokens and encodes the same.
    let json = match t.to_json() {
        Ok(json) => json,
        Err(e) => {
            ensure!(
                e.to_string().contains(&dir.display().to_string()),
                "to_json's error does not name the tokenizer: {e}"
            );
            return Ok(());
        }
    };
    let back = Tokenizer::from_json(&json)
        .map_err(|e| format!("the JSON sent to workers does not load: {e}"))?;
    ensure!(
        back.specials() == t.specials() && back.vocab_size() == t.vocab_size(),
        "the workers' copy differs: specials {:?} vs {:?}, {} vs {} tokens",
        back.specials(),
        t.specials(),
        back.vocab_size(),
        t.vocab_size()
    );
    for text in SAMPLE_TEXTS {
        ensure!(
            back.encode(text).ok() == t.encode(text).ok(),
            "the workers' copy encodes {text:?} differently"
        );
    }
    let _ = Tokenizer::load_with(dir, Some(false));
    Ok(())
}

/// A worker parses the coordinator's `tokenizer.json` text as it comes.
fn check_tokenizer_json(dir: &Path) {
    if let Ok(text) = std::fs::read_to_string(dir.join("tokenizer.json")) {
        if let Ok(t) = Tokenizer::from_json(&text) {
            let _ = t.encode(SAMPLE_TEXTS[0]);
        }
    }
}

// ------------------------------------------------------------------------------------------
// TOML job configs and `--set` overrides.

/// (section, key, valid TOML values). `stages` keys go into `[[stages]]` tables.
const TOML_KEYS: &[(&str, &str, &[&str])] = &[
    ("job", "name", &["\"fuzz\"", "\"\""]),
    ("job", "seed", &["7", "0"]),
    (
        "job",
        "state_dir",
        &["\"state\"", "\"/tmp/tandem-fuzz-state\""],
    ),
    ("job", "token_file", &["\"token\""]),
    ("cluster", "min_workers", &["1", "2"]),
    ("cluster", "max_workers", &["1", "4"]),
    ("cluster", "join_window_s", &["2.0", "0.0", "0.5"]),
    ("cluster", "join_timeout_s", &["300.0", "1.0"]),
    ("cluster", "heartbeat_timeout_s", &["30.0"]),
    ("cluster", "collective_timeout_s", &["120.0"]),
    ("cluster", "ring_transport", &["\"auto\"", "\"tcp\""]),
    ("cluster", "gpu_collective", &["\"nccl\"", "\"ring\""]),
    ("cluster", "bucket_mib", &["25.0", "0.001"]),
    ("cluster", "shard_optimizer", &["true", "false"]),
    ("cluster", "progress_every", &["1", "100"]),
    ("cluster", "progress_log_s", &["10.0", "0.0", "0.1"]),
    ("cluster", "max_restarts", &["3", "0"]),
    (
        "cluster",
        "resize_policy",
        &["\"keep_global_batch\"", "\"keep_per_worker_batch\""],
    ),
    ("cluster", "bogus", &["1"]),
    ("model", "preset", &["\"tiny\"", "\"mini\"", "\"base\""]),
    ("model", "config", &["\"model.json\""]),
    ("model", "dropout", &["0.1", "0.0"]),
    ("model", "max_position_embeddings", &["128", "512"]),
    ("model", "precision", &["\"f32\"", "\"bf16\""]),
    ("model", "tf32", &["true"]),
    ("data", "corpus", &["[\"corpus.txt\"]", "[\"*.txt\"]", "[]"]),
    (
        "data",
        "shard_size",
        &[
            "\"64MiB\"",
            "\"1\"",
            "\"0.5k\"",
            "\"1e400\"",
            "\"12 parsecs\"",
        ],
    ),
    ("data", "max_line_bytes", &["1048576", "0"]),
    ("data", "on_error", &["\"fail\"", "\"skip\""]),
    ("data", "tokenizer", &["\"tok\""]),
    ("data", "vocab_size", &["8192", "16"]),
    ("data", "lowercase", &["true"]),
    ("data.instances", "max_seq_length", &["128", "5"]),
    ("data.instances", "short_seq_prob", &["0.1", "1.0"]),
    ("data.instances", "masked_lm_prob", &["0.15"]),
    ("data.instances", "max_predictions_per_seq", &["20", "0"]),
    ("data.instances", "whole_word_mask", &["true"]),
    ("data.instances", "pad_to_max_length", &["false"]),
    ("checkpoint", "every_steps", &["0", "100"]),
    ("checkpoint", "keep", &["3", "0"]),
    ("stages", "name", &["\"pretrain\"", "\"cls\""]),
    (
        "stages",
        "kind",
        &[
            "\"pretrain\"",
            "\"sequence_classification\"",
            "\"pair_classification\"",
            "\"token_classification\"",
            "\"question_answering\"",
        ],
    ),
    ("stages", "epochs", &["1", "3"]),
    ("stages", "max_steps", &["10"]),
    ("stages", "batch_size", &["16", "1"]),
    ("stages", "grad_accum", &["1", "4"]),
    ("stages", "lr", &["1e-3", "2e-5"]),
    ("stages", "warmup_fraction", &["0.1", "0.0", "1.0"]),
    (
        "stages",
        "decay",
        &["\"linear\"", "\"cosine\"", "\"constant\""],
    ),
    ("stages", "weight_decay", &["0.01", "0.0"]),
    ("stages", "max_grad_norm", &["1.0", "0.0"]),
    ("stages", "train", &["\"train.jsonl\""]),
    ("stages", "dev", &["\"dev.jsonl\""]),
    ("stages", "init_from", &["\"previous\"", "\"ckpt\""]),
    ("stages", "max_seq_length", &["128", "8"]),
    ("stages", "doc_stride", &["128", "0", "16"]),
    ("stages", "max_query_length", &["64", "1"]),
    ("stages", "metric", &["\"accuracy\"", "\"f1\"", "\"bogus\""]),
];
/// Values of any key: the wrong type, out of range, non-finite, past i64.
const TOML_HOSTILE: &[&str] = &[
    "nan",
    "-nan",
    "inf",
    "-inf",
    "+inf",
    "-1",
    "0",
    "-0.0",
    "1e300",
    "-1e300",
    "1e-320",
    "1.5",
    "0.5",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "\"\"",
    "\"x\"",
    "\"nan\"",
    "\"-1\"",
    "true",
    "[]",
    "{}",
    "[1, \"a\"]",
    "1979-05-27T07:32:00Z",
    "\"../../etc/passwd\"",
    "\"\\u0000\"",
];

#[derive(Clone, Debug)]
enum TomlEdit {
    Set {
        key: usize,
        stage: usize,
        value: usize,
        hostile: bool,
    },
    Remove {
        key: usize,
        stage: usize,
    },
}

fn toml_edit() -> impl Strategy<Value = TomlEdit> {
    prop_oneof![
        6 => (0..TOML_KEYS.len(), 0usize..3, any::<usize>(), prop::bool::weighted(0.4))
            .prop_map(|(key, stage, value, hostile)| TomlEdit::Set { key, stage, value, hostile }),
        1 => (0..TOML_KEYS.len(), 0usize..3).prop_map(|(key, stage)| TomlEdit::Remove { key, stage }),
    ]
}

/// A job config rendered from a valid pre-training job with some keys set, made hostile or
/// removed, in up to three stages.
fn render_toml(edits: &[TomlEdit]) -> String {
    let mut sections: BTreeMap<&str, BTreeMap<&str, String>> = BTreeMap::new();
    let mut stages: Vec<BTreeMap<&str, String>> = Vec::new();
    for (s, k, v) in [
        ("job", "name", "\"fuzz\""),
        ("job", "state_dir", "\"state\""),
        ("model", "preset", "\"tiny\""),
        ("data", "corpus", "[\"corpus.txt\"]"),
    ] {
        sections.entry(s).or_default().insert(k, v.into());
    }
    let stage = |i: usize| -> BTreeMap<&'static str, String> {
        let mut m = BTreeMap::new();
        if i == 0 {
            m.insert("name", "\"pretrain\"".into());
            m.insert("kind", "\"pretrain\"".into());
            m.insert("lr", "1e-3".into());
        } else {
            m.insert("name", format!("\"ft{i}\""));
            m.insert("kind", "\"sequence_classification\"".into());
            m.insert("train", "\"train.jsonl\"".into());
            m.insert("dev", "\"dev.jsonl\"".into());
            m.insert("lr", "2e-5".into());
        }
        m
    };
    stages.push(stage(0));
    for e in edits {
        let (key, st) = match e {
            TomlEdit::Set { key, stage, .. } | TomlEdit::Remove { key, stage } => (*key, *stage),
        };
        let (section, k, good) = TOML_KEYS[key];
        let table = if section == "stages" {
            while stages.len() <= st {
                stages.push(stage(stages.len()));
            }
            &mut stages[st]
        } else {
            sections.entry(section).or_default()
        };
        match e {
            TomlEdit::Set { value, hostile, .. } => {
                let v = if *hostile {
                    TOML_HOSTILE[value % TOML_HOSTILE.len()]
                } else {
                    good[value % good.len()]
                };
                table.insert(k, v.into());
            }
            TomlEdit::Remove { .. } => {
                table.remove(k);
            }
        }
    }
    let mut out = String::new();
    for (section, keys) in &sections {
        out += &format!("[{section}]\n");
        for (k, v) in keys {
            out += &format!("{k} = {v}\n");
        }
    }
    for s in &stages {
        out += "[[stages]]\n";
        for (k, v) in s {
            out += &format!("{k} = {v}\n");
        }
    }
    out
}

/// `--set` arguments: a known key with a valid or hostile value, or malformed.
fn override_arg() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0..TOML_KEYS.len(), 0usize..3, any::<usize>(), any::<bool>()).prop_map(
            |(key, stage, value, hostile)| {
                let (section, k, good) = TOML_KEYS[key];
                let v = if hostile {
                    TOML_HOSTILE[value % TOML_HOSTILE.len()]
                } else {
                    good[value % good.len()]
                };
                let v = v.trim_matches('"');
                if section == "stages" {
                    format!("stages[{stage}].{k}={v}")
                } else {
                    format!("{section}.{k}={v}")
                }
            }
        ),
        1 => prop::sample::select(vec![
            "nokey",
            "=",
            "=1",
            "job.name=",
            "a.b.c.d=1",
            "stages[99].lr=1",
            "stages[-1].lr=1",
            "stages[x].lr=1",
            "stages[4294967296].lr=1",
            "stages[18446744073709551615].lr=1",
            "stages[].lr=1",
            "cluster..min_workers=1",
            "cluster.min_workers[0]=1",
            "[[stages]]=1",
            "job.name=\u{0}",
        ])
        .prop_map(String::from),
        1 => "\\PC{0,16}",
    ]
}

#[test]
fn job_config() {
    run_target("job_config", 1.5, || {
        let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(repo().join("configs"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        seeds.sort();
        let text = prop_oneof![
            2 => mutated(seeds, &[b"[[stages]]\n", b"[cluster]\n", b" = ", b"nan", b"inf"]),
            3 => prop::collection::vec(toml_edit(), 0..8).prop_map(|e| render_toml(&e).into_bytes()),
        ];
        let strategy = (text, prop::collection::vec(override_arg(), 0..3)).prop_map(|(t, o)| {
            Case::new()
                .file("job.toml", t)
                .params(json!({ "overrides": o }))
        });
        (strategy, check_job_config)
    });
}

/// A config loads or its error names the file, the `--set` argument or the key; one that loads
/// only holds values the job can use: every duration a real deadline, and the JSON its
/// workers receive reading back as the same config.
fn check_job_config(dir: &Path) -> Result<(), String> {
    let path = dir.join("job.toml");
    let overrides: Vec<String> = params(dir)["overrides"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let cfg = match JobConfig::load(&path, &overrides) {
        Err(e) => {
            let ok = match &e {
                ConfigError::Load { path: p, msg } => p == &path && !msg.is_empty(),
                ConfigError::BadOverride(a) => overrides.contains(a),
                ConfigError::Override { arg, msg } => overrides.contains(arg) && !msg.is_empty(),
                ConfigError::Invalid { key, msg } => {
                    let section = key.split(['.', '[']).next().unwrap_or("");
                    ["job", "cluster", "model", "data", "checkpoint", "stages"].contains(&section)
                        && !msg.is_empty()
                }
                ConfigError::Missing(_) => false,
            };
            ensure!(ok, "the error does not say where: {e:?}");
            return Ok(());
        }
        Ok(cfg) => cfg,
    };
    accepted();
    let c = &cfg.cluster;
    for (k, v) in [
        ("join_window_s", c.join_window_s),
        ("join_timeout_s", c.join_timeout_s),
        ("heartbeat_timeout_s", c.heartbeat_timeout_s),
        ("collective_timeout_s", c.collective_timeout_s),
        ("progress_log_s", c.progress_log_s),
    ] {
        let d = Duration::try_from_secs_f64(v)
            .map_err(|e| format!("cluster.{k} = {v} was accepted but is no duration: {e}"))?;
        ensure!(
            Instant::now().checked_add(d).is_some(),
            "cluster.{k} = {v} was accepted but no deadline is that far"
        );
    }
    let json = serde_json::to_string(&cfg).map_err(|e| e.to_string())?;
    let back: JobConfig = serde_json::from_str(&json).map_err(|e| {
        format!("the accepted config does not survive the JSON sent to workers: {e}\n{json}")
    })?;
    ensure!(back == cfg, "the workers' copy differs:\n{json}");
    for (i, s) in cfg.stages.iter().enumerate() {
        check_qa_options(s.max_seq_length, s.doc_stride, s.max_query_length)
            .map_err(|e| format!("stages[{i}]: {e}"))?;
    }
    let _ = cfg.check_paths();
    Ok(())
}

/// Options that validate leave every window room for context beyond the stride.
fn check_qa_options(
    max_seq_length: usize,
    doc_stride: usize,
    max_query_length: usize,
) -> Result<(), String> {
    let o = QaOptions {
        max_seq_length,
        doc_stride,
        max_query_length,
    };
    if o.validate().is_ok() {
        let room = max_query_length
            .checked_add(3)
            .and_then(|n| n.checked_add(doc_stride))
            .is_some_and(|n| n < max_seq_length);
        ensure!(
            room && max_query_length > 0,
            "QA options {o:?} validate but leave no context window beyond the stride"
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Fine-tuning data sets.

/// An error of a data set reader says which file and where in it.
fn dataset_error(e: &Error, file: &Path, bytes: &[u8]) -> Result<(), String> {
    match e {
        Error::Dataset { path, at, msg } => {
            ensure!(
                path == file,
                "the error names {} instead of {}",
                path.display(),
                file.display()
            );
            let lines = line_count(bytes);
            let at_ok = at == "end of file"
                || at == "`data`"
                || at.starts_with("question `")
                || at
                    .strip_prefix("line ")
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| (1..=lines).contains(&n));
            ensure!(
                at_ok && !msg.is_empty(),
                "the error says {at:?} ({lines} lines): {msg}"
            );
        }
        Error::Json { path, .. } => ensure!(path == file, "the error names {}", path.display()),
        // Text that is not UTF-8, read whole.
        Error::Io { path, source } if source.kind() == std::io::ErrorKind::InvalidData => {
            ensure!(path == file, "the error names {}", path.display())
        }
        other => return Err(format!("the error does not say where: {other}")),
    }
    Ok(())
}

const DATA_DICT: &[&[u8]] = &[
    b"{\"text\": \"x\", \"label\": \"pos\"}",
    b"{\"text_a\": \"x\", \"text_b\": \"y\", \"label\": 1}",
    b"\"label\": 1.5",
    b"\"label\": -1",
    b"\ttext_b",
    b"\tlabel",
];

fn data_seeds() -> Vec<Vec<u8>> {
    let tsv = |path: &str, pairs: bool| -> Vec<u8> {
        let text = String::from_utf8(read_seed(path, 900)).unwrap();
        let mut out = if pairs {
            "text_a\ttext_b\tlabel\n".to_string()
        } else {
            "text\tlabel\n".to_string()
        };
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let row = if pairs {
                format!(
                    "{}\t{}\t{}\n",
                    v["text_a"].as_str().unwrap_or("a"),
                    v["text_b"].as_str().unwrap_or("b"),
                    v["label"]
                )
            } else {
                format!("{}\t{}\n", v["text"].as_str().unwrap_or("a"), v["label"])
            };
            out += &row.replace('"', "");
        }
        out.into_bytes()
    };
    vec![
        read_seed("configs/data/sentiment/train.jsonl", 900),
        read_seed("configs/data/pairs/train.jsonl", 900),
        tsv("configs/data/sentiment/train.jsonl", false),
        tsv("configs/data/pairs/train.jsonl", true),
    ]
}

/// JSONL records built from the classification keys.
fn jsonl_records(keys: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(json_value(keys), 0..6).prop_map(|records| {
        records
            .iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>()
            .into_bytes()
    })
}

const CLASSIFICATION_KEYS: &[&str] = &["text", "text_a", "text_b", "label", "id"];

/// Mostly the extension the content's shape suggests (JSON lines or TSV), sometimes any.
fn extension(content: &[u8], pick: u8) -> &'static str {
    let json = content.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    match (pick % 8, json) {
        (0, _) => ["tsv", "txt", "jsonl", "json"][usize::from(pick / 8) % 4],
        (1..=5, true) => "jsonl",
        (_, true) => "json",
        (1..=5, false) => "tsv",
        (_, false) => "txt",
    }
}

/// Classification JSON lines of one schema (texts or pairs, labelled or not), with texts and
/// labels of every kind and now and then a record that breaks the schema.
fn classification_records() -> impl Strategy<Value = Vec<u8>> {
    let text = prop_oneof![
        4 => prop::sample::select(vec!["the cat sat", "a good movie", "who is john ?", "é 日本", "x"])
            .prop_map(Value::from),
        1 => json_leaf(),
    ];
    let label = prop_oneof![
        4 => prop::sample::select(vec!["pos", "neg", "0", "1"]).prop_map(Value::from),
        1 => json_leaf(),
    ];
    let record = (text.clone(), text, label, 0u8..20);
    (
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(record, 1..8),
    )
        .prop_map(|(pairs, labelled, records)| {
            let mut out = String::new();
            for (a, b, l, odd) in records {
                let mut r = if pairs ^ (odd == 0) {
                    json!({ "text_a": a, "text_b": b })
                } else {
                    json!({ "text": a })
                };
                if labelled ^ (odd == 1) {
                    r["label"] = l;
                }
                out += &format!("{r}\n");
            }
            out.into_bytes()
        })
}

#[test]
fn classification() {
    run_target("classification", 1.5, || {
        let strategy = (
            prop_oneof![
                4 => mutated(data_seeds(), DATA_DICT),
                3 => classification_records(),
                1 => jsonl_records(CLASSIFICATION_KEYS),
                1 => token_soup(DATA_DICT),
            ],
            any::<u8>(),
            prop::sample::select(vec![0usize, 2, 3, 4, 8, 16, 128, usize::MAX]),
        )
            .prop_map(|(b, pick, max)| {
                Case::new()
                    .file(&format!("data.{}", extension(&b, pick)), b)
                    .params(json!({ "max_seq_length": max }))
            });
        let tok = small_tokenizer(&scratch("classification"));
        (strategy, move |dir: &Path| check_classification(dir, &tok))
    });
}

/// A set reads or names file and line; a read set has non-empty texts, one schema, a label
/// map when labelled, and features no longer than asked that collate into a batch.
fn check_classification(dir: &Path, tok: &Tokenizer) -> Result<(), String> {
    let file = find_file(dir, &["data.tsv", "data.txt", "data.jsonl", "data.json"])?;
    let bytes = std::fs::read(&file).unwrap();
    let max = param_usize(&params(dir), "max_seq_length", 128);
    let set = match ClassificationSet::read(&file) {
        Err(e) => return dataset_error(&e, &file, &bytes),
        Ok(set) => set,
    };
    accepted();
    ensure!(!set.examples.is_empty(), "a set without examples");
    for e in &set.examples {
        ensure!(
            !e.text_a.trim().is_empty() && e.text_b.as_ref().is_none_or(|b| !b.trim().is_empty()),
            "an empty text at line {}",
            e.line
        );
        ensure!(
            e.text_b.is_some() == set.pairs,
            "mixed single and pair texts"
        );
        ensure!(
            e.label.is_some() == set.labelled,
            "mixed labelled and unlabelled"
        );
    }
    let labels = if set.labelled {
        Some(set.label_map().map_err(|e| format!("label map: {e}"))?)
    } else {
        None
    };
    match set.featurize(tok, labels.as_ref(), max) {
        Ok(fs) => {
            ensure!(fs.len() == set.len(), "features lost");
            for f in &fs {
                ensure!(
                    f.input_ids.len() <= max && f.input_ids.len() == f.token_type_ids.len(),
                    "a feature of {} tokens for max_seq_length {max}",
                    f.input_ids.len()
                );
            }
            collate_classification(&fs, tok.pad_id(), Padding::Longest)
                .map_err(|e| format!("collate: {e}"))?;
        }
        Err(e) => ensure!(max <= 3, "featurize failed: {e}"),
    }
    Ok(())
}

#[test]
fn label_map() {
    run_target("label_map", 0.5, || {
        let strategy = prop_oneof![
            2 => json_value(&["labels", "0", "1"]).prop_map(|v| v.to_string().into_bytes()),
            2 => prop::collection::vec(json_leaf(), 0..6)
                .prop_map(|l| json!({ "labels": l }).to_string().into_bytes()),
            3 => prop::collection::vec(prop::sample::select(STRINGS), 0..6)
                .prop_map(|l| json!({ "labels": l }).to_string().into_bytes()),
            1 => mutated(vec![br#"{"labels": ["neg", "pos"]}"#.to_vec()], &[]),
        ]
        .prop_map(|b| Case::new().file("labels.json", b));
        (strategy, check_label_map)
    });
}

/// A label map loads (distinct names that survive save and load) or names its file.
fn check_label_map(dir: &Path) -> Result<(), String> {
    let path = dir.join("labels.json");
    match LabelMap::load(&path) {
        Err(e) => ensure!(
            e.to_string().contains(&path.display().to_string()),
            "the error does not name the file: {e}"
        ),
        Ok(m) => {
            accepted();
            let mut names = m.names().to_vec();
            names.sort();
            names.dedup();
            ensure!(names.len() == m.len(), "duplicate labels accepted");
            let again = dir.join("again.json");
            m.save(&again).map_err(|e| e.to_string())?;
            ensure!(
                LabelMap::load(&again).ok().as_ref() == Some(&m),
                "save and load differ"
            );
        }
    }
    Ok(())
}

#[test]
fn conll() {
    run_target("conll", 1.0, || {
        let seeds = vec![
            read_seed("configs/data/ner/train.conll", 700),
            b"John B-PER\nlives O\n\nParis B-LOC\n".to_vec(),
        ];
        let strategy = (
            prop_oneof![
                4 => mutated(seeds, &[b"-DOCSTART- O", b" B-LOC", b" \t "]),
                1 => token_soup(&[b" O\n", b" B-PER\n", b"\n\n"]),
            ],
            prop::sample::select(vec![0usize, 2, 3, 4, 8, 32, usize::MAX]),
        )
            .prop_map(|(b, max)| {
                Case::new()
                    .file("data.conll", b)
                    .params(json!({ "max_seq_length": max }))
            });
        let tok = small_tokenizer(&scratch("conll"));
        (strategy, move |dir: &Path| check_conll(dir, &tok))
    });
}

/// A CoNLL file reads or names file and line; its features fit and collate.
fn check_conll(dir: &Path, tok: &Tokenizer) -> Result<(), String> {
    let file = dir.join("data.conll");
    let bytes = std::fs::read(&file).unwrap();
    let max = param_usize(&params(dir), "max_seq_length", 128);
    let set = match TokenSet::read(&file) {
        Err(e) => return dataset_error(&e, &file, &bytes),
        Ok(s) => s,
    };
    accepted();
    for e in &set.examples {
        ensure!(
            !e.words.is_empty() && e.words.len() == e.labels.len(),
            "sentence at line {} has {} words, {} labels",
            e.line,
            e.words.len(),
            e.labels.len()
        );
    }
    let labels = set.label_map().map_err(|e| format!("label map: {e}"))?;
    match set.featurize(tok, Some(&labels), max) {
        Ok(fs) => {
            for f in &fs {
                ensure!(
                    f.input_ids.len() <= max && f.word_ids.len() == f.input_ids.len(),
                    "a feature of {} tokens for max_seq_length {max}",
                    f.input_ids.len()
                );
            }
            collate_tokens(&fs, tok.pad_id(), Padding::Longest)
                .map_err(|e| format!("collate: {e}"))?;
        }
        Err(e) => ensure!(max <= 2, "featurize failed: {e}"),
    }
    Ok(())
}

const SQUAD_CONTEXTS: &[&str] = &[
    "John Smith lives in Paris.",
    "the cat sat on the mat",
    "é\u{301} naïve café 日本語 — テスト",
    " ",
    "",
    "a",
    "\u{10ffff}\u{0}x",
];

/// An answer of `context`: mostly a real span at its character offset, else anything.
fn squad_answer(context: &'static str) -> impl Strategy<Value = Value> {
    let n = context.chars().count();
    let span = (0..=n, 0..=n).prop_map(move |(a, b)| {
        let (a, b) = (a.min(b), a.max(b));
        let text: String = context.chars().skip(a).take(b - a).collect();
        json!({ "text": text, "answer_start": a })
    });
    let other = (
        prop_oneof![
            3 => prop::sample::select(vec!["Paris", "John Smith", "cat", "é", "日本", "x", "", " "])
                .prop_map(Value::from),
            1 => json_leaf(),
        ],
        prop_oneof![
            3 => (0u64..30).prop_map(Value::from),
            1 => json_leaf(),
        ],
    )
        .prop_map(|(text, start)| json!({ "text": text, "answer_start": start }));
    prop_oneof![4 => span, 1 => other]
}

fn squad_file() -> impl Strategy<Value = Vec<u8>> {
    let question = |context: &'static str| {
        (
            prop::sample::select(vec!["q1", "q2", "q3", "q1", "", "é"]),
            prop::sample::select(vec!["Where does John live?", "where?", "", " ", "x"]),
            prop::collection::vec(squad_answer(context), 0..3),
            prop::option::of(any::<bool>()),
        )
            .prop_map(|(id, q, answers, imp)| {
                let mut v = json!({ "id": id, "question": q, "answers": answers });
                if let Some(b) = imp {
                    v["is_impossible"] = b.into();
                }
                v
            })
    };
    let paragraph = prop::sample::select(SQUAD_CONTEXTS).prop_flat_map(move |c| {
        prop::collection::vec(question(c), 0..3)
            .prop_map(move |qas| json!({ "context": c, "qas": qas }))
    });
    (
        prop::collection::vec(prop::collection::vec(paragraph, 0..3), 0..3),
        prop::option::of(prop::sample::select(vec!["v2.0", "1.1", "2", ""])),
    )
        .prop_map(|(articles, version)| {
            let data: Vec<Value> = articles
                .into_iter()
                .map(|ps| json!({ "title": "t", "paragraphs": ps }))
                .collect();
            let mut v = json!({ "data": data });
            if let Some(ver) = version {
                v["version"] = ver.into();
            }
            v.to_string().into_bytes()
        })
}

fn window_size() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..40,
        1 => prop::sample::select(vec![
            64,
            128,
            384,
            usize::MAX,
            usize::MAX - 1,
            usize::MAX - 2,
            usize::MAX - 3,
            1 << 63,
            u32::MAX as usize,
        ]),
    ]
}

#[test]
fn squad() {
    run_target("squad", 1.5, || {
        let strategy = (
            prop_oneof![
                2 => mutated(vec![read_seed("configs/data/qa/dev.json", 1 << 20)], &[b"\"answer_start\": ", b"\"is_impossible\": true"]),
                3 => squad_file(),
            ],
            window_size(),
            window_size(),
            window_size(),
        )
            .prop_map(|(b, seq, stride, query)| {
                Case::new().file("data.json", b).params(json!({
                    "max_seq_length": seq, "doc_stride": stride, "max_query_length": query,
                }))
            });
        let tok = small_tokenizer(&scratch("squad"));
        (strategy, move |dir: &Path| check_squad(dir, &tok))
    });
}

/// A SQuAD file reads or names file and question; valid window options give windows that fit,
/// with answer positions inside them.
fn check_squad(dir: &Path, tok: &Tokenizer) -> Result<(), String> {
    let file = dir.join("data.json");
    let bytes = std::fs::read(&file).unwrap();
    let p = params(dir);
    let opts = QaOptions {
        max_seq_length: param_usize(&p, "max_seq_length", 384),
        doc_stride: param_usize(&p, "doc_stride", 128),
        max_query_length: param_usize(&p, "max_query_length", 64),
    };
    check_qa_options(opts.max_seq_length, opts.doc_stride, opts.max_query_length)?;
    let set = match QaSet::read(&file) {
        Err(e) => return dataset_error(&e, &file, &bytes),
        Ok(s) => s,
    };
    accepted();
    for e in &set.examples {
        for (text, start) in &e.answers {
            let n = text.chars().count();
            ensure!(
                e.context_chars(*start, start + n) == text,
                "answer {text:?} is not at character {start} of its context"
            );
        }
    }
    if opts.validate().is_err() {
        ensure!(
            set.featurize(tok, &opts).is_err(),
            "invalid options featurize"
        );
        return Ok(());
    }
    let fs = set
        .featurize(tok, &opts)
        .map_err(|e| format!("featurize: {e}"))?;
    for f in &fs {
        let n = f.input_ids.len();
        ensure!(
            n <= opts.max_seq_length && f.token_type_ids.len() == n && f.offsets.len() == n,
            "a window of {n} tokens for {opts:?}"
        );
        ensure!(
            (f.start_position as usize) < n
                && f.start_position <= f.end_position
                && (f.end_position as usize) < n,
            "answer positions {}..{} outside a window of {n}",
            f.start_position,
            f.end_position
        );
    }
    if !fs.is_empty() {
        collate_qa(&fs, tok.pad_id(), Padding::Longest).map_err(|e| format!("collate: {e}"))?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// `tandem predict` inputs.

const PREDICT_KEYS: &[&str] = &[
    "text", "text_a", "text_b", "question", "context", "id", "data",
];

#[test]
fn predict_inputs() {
    run_target("predict_inputs", 0.5, || {
        let root = scratch("predict");
        let heads = ["seqcls", "tokcls", "qa"];
        let predictors: Vec<Predictor> = heads
            .iter()
            .map(|h| {
                let src = repo().join("tests/fixtures/roundtrip").join(h);
                let d = root.join(h);
                std::fs::create_dir_all(&d).unwrap();
                for f in ["model.safetensors", "config.json"] {
                    std::fs::copy(src.join(f), d.join(f)).unwrap();
                }
                std::fs::write(d.join("vocab.txt"), VOCAB.join("\n") + "\n").unwrap();
                Predictor::load(&d, &Device::Cpu).unwrap()
            })
            .collect();
        // (head, extension, content) as a user would give them.
        let squad = br#"{"data": [{"paragraphs": [{"context": "john lives in paris", "qas": [{"id": "a", "question": "where?", "answers": [{"text": "paris", "answer_start": 14}]}]}]}]}"#;
        let texts = read_seed(
            "tests/fixtures/hf_tokenizers/seqcls_padded/inputs.jsonl",
            600,
        );
        let combos: Arc<Vec<(usize, &str, Vec<u8>)>> = Arc::new(vec![
            (0, "jsonl", texts.clone()),
            (
                0,
                "jsonl",
                read_seed(
                    "tests/fixtures/hf_tokenizers/seqcls_padded/inputs_pairs.jsonl",
                    600,
                ),
            ),
            (
                0,
                "tsv",
                b"text\tlabel\nthe cat sat\tpos\nok\tneg\n".to_vec(),
            ),
            (0, "txt", b"text_a\ttext_b\nthe cat\tsat\n".to_vec()),
            (1, "jsonl", texts),
            (1, "conll", read_seed("configs/data/ner/dev.conll", 400)),
            (1, "txt", b"john B-PER\nlives O\n".to_vec()),
            (
                2,
                "jsonl",
                read_seed("tests/fixtures/hf_tokenizers/qa_padded/inputs.jsonl", 600),
            ),
            (2, "json", squad.to_vec()),
        ]);
        let exts = vec!["jsonl", "json", "tsv", "txt", "conll", ""];
        let file = |head: usize, ext: &str, b: Vec<u8>| {
            let name = if ext.is_empty() {
                "input".to_string()
            } else {
                format!("input.{ext}")
            };
            Case::new().file(&name, b).params(json!({ "head": head }))
        };
        let mutated_combo = (
            0..combos.len(),
            prop::collection::vec(mutation(DICT.len()), 0..3),
            0u8..10,
            0usize..3,
            prop::sample::select(exts.clone()),
        )
            .prop_map(move |(i, muts, odd, head, ext)| {
                let (h, e, seed) = &combos[i];
                let mut b = seed.clone();
                for m in &muts {
                    apply(&mut b, m, DICT);
                }
                // Now and then another head or extension than the content is for.
                if odd == 0 {
                    file(head, ext, b)
                } else {
                    file(*h, e, b)
                }
            });
        let built = (
            prop_oneof![
                2 => jsonl_records(PREDICT_KEYS),
                1 => classification_records(),
                1 => squad_file(),
            ],
            0usize..3,
            prop::sample::select(exts),
        )
            .prop_map(move |(b, head, ext)| file(head, ext, b));
        let strategy = prop_oneof![3 => mutated_combo, 2 => built];
        let _ = &root;
        let check = move |dir: &Path| {
            let head = param_usize(&params(dir), "head", 0).min(2);
            check_predict_inputs(dir, &predictors[head])
        };
        (strategy, check)
    });
}

/// Inputs read or the error names the file; read inputs predict, one result each.
fn check_predict_inputs(dir: &Path, p: &Predictor) -> Result<(), String> {
    let file = find_file(
        dir,
        &[
            "input.jsonl",
            "input.json",
            "input.tsv",
            "input.txt",
            "input.conll",
            "input",
        ],
    )?;
    let inputs = match p.read_inputs(&file) {
        Err(e) => {
            ensure!(
                e.to_string().contains(&file.display().to_string()),
                "the error does not name the file: {e}"
            );
            return Ok(());
        }
        Ok(i) => i,
    };
    accepted();
    let inputs = match inputs {
        Inputs::Classification(mut v) => {
            ensure!(!v.is_empty(), "no inputs");
            v.truncate(6);
            Inputs::Classification(v)
        }
        Inputs::Tokens(mut v) => {
            ensure!(!v.is_empty(), "no inputs");
            v.truncate(6);
            Inputs::Tokens(v)
        }
        Inputs::Qa {
            mut examples,
            mut ids,
            version_2,
        } => {
            ensure!(
                !examples.is_empty() && examples.len() == ids.len(),
                "QA inputs and ids"
            );
            examples.truncate(6);
            ids.truncate(6);
            Inputs::Qa {
                examples,
                ids,
                version_2,
            }
        }
    };
    let n = match &inputs {
        Inputs::Classification(v) => v.len(),
        Inputs::Tokens(v) => v.len(),
        Inputs::Qa { examples, .. } => examples.len(),
    };
    let opts = PredictOptions {
        checkpoint: p.dir.clone(),
        input: file.clone(),
        output: None,
        batch_size: 4,
        max_seq_length: Some(16),
        doc_stride: 4,
    };
    let mut emitted = 0;
    p.predict(&inputs, &opts, &indicatif::ProgressBar::hidden(), |_| {
        emitted += 1;
        Ok(())
    })
    .map_err(|e| format!("accepted inputs do not predict: {e}"))?;
    ensure!(emitted == n, "{emitted} predictions for {n} inputs");
    Ok(())
}

// ------------------------------------------------------------------------------------------
// The ring's listener handshake, over real sockets.

#[derive(Clone, Debug, Serialize, Deserialize)]
enum After {
    /// Close at once.
    Close,
    /// Stop sending, keep reading until the peer closes (or a short while).
    HalfClose,
    /// Stay silent this long, then close.
    Linger(u64),
}

/// One stranger's connection to a rank's listener.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stranger {
    to_rank: usize,
    bytes: Vec<u8>,
    after: After,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Attack {
    /// The second rank takes part (the ring must form despite the strangers); otherwise rank 1
    /// is alone and rank 0's address answers with `reply` (it must fail within its timeout).
    with_peer: bool,
    tcp_only: bool,
    strangers: Vec<Stranger>,
    reply: Vec<u8>,
}

const RING_GENERATION: u64 = 7;
const RING_TOKEN: &str = "fuzz-ring-token-0123456789";

/// Bytes a ring peer might send: a hello with some fields right and some wrong, proofs, noise.
fn hello_like() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        3 => prop::sample::select(vec![0u64, 1, 2, RING_GENERATION]),
        1 => any::<u64>(),
        1 => Just(u64::MAX),
    ];
    let hello = (
        prop::sample::select(vec![
            b"TNDMRNG1".to_vec(),
            b"TNDMRNG2".to_vec(),
            b"TNDMRNG".to_vec(),
            b"XXXXXXXX".to_vec(),
            vec![],
        ]),
        prop::collection::vec(field, 0..5),
        prop::collection::vec(any::<u8>(), 0..80),
    )
        .prop_map(|(magic, fields, tail)| {
            let mut b = magic;
            for f in fields {
                b.extend(f.to_le_bytes());
            }
            b.extend(tail);
            b
        });
    prop_oneof![3 => hello, 1 => noise(), 1 => Just(vec![])]
}

fn attack(with_peer: bool) -> impl Strategy<Value = Case> {
    let stranger = (
        0usize..2,
        hello_like(),
        prop_oneof![
            3 => Just(After::Close),
            2 => Just(After::HalfClose),
            1 => (0u64..500).prop_map(After::Linger),
        ],
    )
        .prop_map(|(to_rank, bytes, after)| Stranger {
            to_rank,
            bytes,
            after,
        });
    (
        any::<bool>(),
        prop::collection::vec(stranger, 1..5),
        prop_oneof![
            2 => Just(vec![0u8]),
            1 => Just(vec![1u8]),
            2 => hello_like(),
        ],
    )
        .prop_map(move |(tcp_only, strangers, reply)| {
            let a = Attack {
                with_peer,
                tcp_only,
                strangers,
                reply,
            };
            Case::new().file("attack.json", serde_json::to_vec(&a).unwrap())
        })
}

fn send_as_stranger(to: SocketAddr, s: &Stranger) {
    let Ok(mut c) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
        return;
    };
    let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = c.write_all(&s.bytes);
    match s.after {
        After::Close => {}
        After::HalfClose => {
            let _ = c.shutdown(std::net::Shutdown::Write);
            let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
            let mut sink = [0u8; 256];
            while matches!(c.read(&mut sink), Ok(n) if n > 0) {}
        }
        After::Linger(ms) => thread::sleep(Duration::from_millis(ms)),
    }
}

#[test]
fn ring_handshake() {
    run_target("ring_handshake", 0.05, || (attack(true), check_ring));
}

#[test]
fn ring_handshake_alone() {
    run_target("ring_alone", 0.004, || (attack(false), check_ring));
}

/// Strangers on the listeners never break a ring that can form, and a ring that cannot form
/// fails within its timeout, naming the rank: no panic, no hang.
fn check_ring(dir: &Path) -> Result<(), String> {
    let a: Attack = serde_json::from_slice(&std::fs::read(dir.join("attack.json")).unwrap())
        .map_err(|e| format!("attack.json: {e}"))?;
    let transport = if a.tcp_only {
        Transport::Tcp
    } else {
        Transport::Auto
    };
    let bind = || RingListener::from(TcpListener::bind("127.0.0.1:0").unwrap());
    if a.with_peer {
        let ls = [bind(), bind()];
        let addrs: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        let strangers: Vec<_> = a
            .strangers
            .iter()
            .cloned()
            .map(|s| {
                let to = addrs[s.to_rank % 2];
                thread::spawn(move || send_as_stranger(to, &s))
            })
            .collect();
        let (tx, rx) = mpsc::channel();
        for (rank, l) in ls.into_iter().enumerate() {
            let mut cfg = RingConfig::new(rank, 2, addrs.clone(), RING_TOKEN, RING_GENERATION);
            cfg.timeout = Duration::from_secs(10);
            cfg.transport = transport;
            let tx = tx.clone();
            thread::spawn(move || {
                let r = Ring::connect(cfg, l).and_then(|mut ring| {
                    let mut v = vec![rank as f32 + 1.0, 10.0];
                    ring.all_reduce_sum(&mut v)?;
                    Ok(v)
                });
                let _ = tx.send((rank, r.map_err(|e| e.to_string())));
            });
        }
        for _ in 0..2 {
            let (rank, r) = rx
                .recv_timeout(Duration::from_secs(30))
                .map_err(|_| "a rank hung: no result within 30 s".to_string())?;
            let v = r.map_err(|e| format!("rank {rank} failed despite its peer: {e}"))?;
            ensure!(v == [3.0, 20.0], "rank {rank} reduced to {v:?}");
        }
        accepted();
        // Strangers still lingering end by themselves.
        drop(strangers);
    } else {
        let l = bind();
        let fake = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = vec![fake.local_addr().unwrap(), l.local_addr().unwrap()];
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (stop, reply) = (stop.clone(), a.reply.clone());
            fake.set_nonblocking(true).unwrap();
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match fake.accept() {
                        Ok((mut c, _)) => {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_write_timeout(Some(Duration::from_millis(500)));
                            let _ = c.write_all(&reply);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        let strangers: Vec<_> = a
            .strangers
            .iter()
            .cloned()
            .map(|s| {
                let to = peers[1];
                thread::spawn(move || send_as_stranger(to, &s))
            })
            .collect();
        let timeout = Duration::from_millis(700);
        let mut cfg = RingConfig::new(1, 2, peers, RING_TOKEN, RING_GENERATION);
        cfg.timeout = timeout;
        cfg.transport = transport;
        let (tx, rx) = mpsc::channel();
        let start = Instant::now();
        thread::spawn(move || {
            let _ = tx.send(Ring::connect(cfg, l).map(|_| ()).map_err(|e| e.to_string()));
        });
        let r = rx.recv_timeout(timeout + Duration::from_secs(15));
        stop.store(true, Ordering::SeqCst);
        let _ = server.join();
        for s in strangers {
            let _ = s.join();
        }
        match r {
            Err(_) => return Err(format!("connect still running after {:?}", start.elapsed())),
            Ok(Ok(())) => return Err("a ring formed with no peer".into()),
            Ok(Err(e)) => ensure!(
                e.contains("rank 1"),
                "the error does not name the rank: {e}"
            ),
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// gRPC requests through a real coordinator.

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Token {
    Right,
    Wrong(String),
    Missing,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Chunk {
    name: String,
    file: String,
    data: Vec<u8>,
    right_sha: bool,
    last_of_file: bool,
}

/// A request; `job` and `generation` are `None` for the coordinator's own.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Call {
    Join {
        protocol_version: u32,
        job: Option<String>,
        worker_id: String,
        ring_addr: String,
        threads: u32,
        device: String,
    },
    Progress {
        job: Option<String>,
        generation: Option<u64>,
        rank: u32,
        stage_index: u32,
        step: u64,
        done: bool,
        error: String,
        metrics_json: String,
        steps: u32,
    },
    FetchShard {
        job: Option<String>,
        generation: Option<u64>,
        shard_id: u32,
    },
    FetchStageFile {
        job: Option<String>,
        generation: Option<u64>,
        stage_index: u32,
        role: String,
    },
    PutCheckpoint {
        job: Option<String>,
        generation: Option<u64>,
        chunks: Vec<Chunk>,
    },
    GetCheckpoint {
        job: Option<String>,
        generation: Option<u64>,
        name: String,
    },
    Status,
    /// Raw bytes to the gRPC port (not HTTP/2).
    Raw(Vec<u8>),
    /// A checkpoint in the coordinator's store with this `MANIFEST.json` (beside a file
    /// `a.bin` holding `abc`), asked for by name, then removed.
    Manifest(Vec<u8>),
}

/// A manifest of the store's layout for one file `a.bin` holding `abc`.
fn manifest_seed() -> Vec<u8> {
    json!({
        "name": "m",
        "files": { "a.bin": [3, sha256_hex(b"abc")] },
        "seq": 0,
        "created_unix_s": 0,
    })
    .to_string()
    .into_bytes()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Request {
    token: Token,
    call: Call,
}

/// Names of checkpoints and files: ordinary, reserved and path-like. `$PLANTED` is the absolute
/// path of a directory outside the store holding a valid-looking checkpoint.
const NAMES: &[&str] = &[
    "pretrain-s0-step-1",
    "x",
    "",
    ".",
    "..",
    ".tmp-x",
    "../../etc/passwd",
    "../../planted",
    "../checkpoints/../../planted",
    "$PLANTED",
    "/etc",
    "a/b",
    "a\\b",
    "x\u{0}y",
    "MANIFEST.json",
    "model.safetensors",
    "pretrain-final",
    "é",
];

fn grpc_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(NAMES).prop_map(String::from),
        1 => "\\PC{0,20}",
        1 => (1usize..20_000).prop_map(|n| "a".repeat(n)),
    ]
}

fn job_choice() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(0.2, prop_oneof![Just(String::new()), grpc_string()])
}

fn generation_choice() -> impl Strategy<Value = Option<u64>> {
    prop::option::weighted(0.2, prop_oneof![Just(1u64), Just(u64::MAX), any::<u64>()])
}

fn call() -> impl Strategy<Value = Call> {
    let big_u32 = prop_oneof![3 => 0u32..4, 1 => Just(u32::MAX), 1 => any::<u32>()];
    let chunk = (
        grpc_string(),
        grpc_string(),
        prop::collection::vec(any::<u8>(), 0..64),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(name, file, data, right_sha, last_of_file)| Chunk {
            name,
            file,
            data,
            right_sha,
            last_of_file,
        });
    prop_oneof![
        2 => (
            prop_oneof![3 => Just(1u32), 1 => any::<u32>()],
            job_choice(),
            grpc_string(),
            prop_oneof![Just(String::new()), Just("127.0.0.1:1".to_string()), grpc_string()],
            any::<u32>(),
            grpc_string()
        )
            .prop_map(|(protocol_version, job, worker_id, ring_addr, threads, device)| Call::Join {
                protocol_version, job, worker_id, ring_addr, threads, device,
            }),
        2 => (
            job_choice(),
            generation_choice(),
            big_u32.clone(),
            big_u32.clone(),
            any::<u64>(),
            any::<bool>(),
            prop_oneof![Just(String::new()), grpc_string()],
            prop_oneof![Just(String::new()), Just("{".to_string()), grpc_string()],
            0u32..50,
        )
            .prop_map(|(job, generation, rank, stage_index, step, done, error, metrics_json, steps)| {
                Call::Progress { job, generation, rank, stage_index, step, done, error, metrics_json, steps }
            }),
        2 => (job_choice(), generation_choice(), big_u32.clone())
            .prop_map(|(job, generation, shard_id)| Call::FetchShard { job, generation, shard_id }),
        1 => (job_choice(), generation_choice(), big_u32, prop_oneof![Just("train".to_string()), grpc_string()])
            .prop_map(|(job, generation, stage_index, role)| Call::FetchStageFile { job, generation, stage_index, role }),
        2 => (job_choice(), generation_choice(), prop::collection::vec(chunk, 0..4))
            .prop_map(|(job, generation, chunks)| Call::PutCheckpoint { job, generation, chunks }),
        4 => (job_choice(), generation_choice(), grpc_string())
            .prop_map(|(job, generation, name)| Call::GetCheckpoint { job, generation, name }),
        1 => Just(Call::Status),
        1 => noise().prop_map(Call::Raw),
        2 => mutated(
            vec![manifest_seed()],
            &[b"\"../a.bin\"", b"\"/etc/passwd\"", b"\"..\"", b"\"MANIFEST.json\"", b"\"\""],
        )
        .prop_map(Call::Manifest),
    ]
}

fn grpc_requests() -> impl Strategy<Value = Case> {
    let token = prop_oneof![
        8 => Just(Token::Right),
        1 => Just(Token::Missing),
        1 => grpc_string().prop_map(Token::Wrong),
    ];
    prop::collection::vec(
        (token, call()).prop_map(|(token, call)| Request { token, call }),
        1..6,
    )
    .prop_map(|rs| Case::new().file("requests.json", serde_json::to_vec(&rs).unwrap()))
}

/// The coordinator under test, its address and what a request needs to know.
struct Coordinator {
    dir: PathBuf,
    child: Mutex<common::Reap>,
    url: String,
    token: String,
    planted: PathBuf,
    log: PathBuf,
    rt: tokio::runtime::Runtime,
}

type Client = tandem::proto::coordinator_client::CoordinatorClient<tonic::transport::Channel>;

fn start_coordinator() -> Coordinator {
    let dir = common::job_dir(
        "fuzz-grpc",
        64,
        64,
        "join_timeout_s = 900\nheartbeat_timeout_s = 60\ncollective_timeout_s = 5",
        "",
        16,
    );
    // A checkpoint outside the store (state/checkpoints), where a path-like name could reach.
    let planted = dir.join("planted");
    std::fs::create_dir_all(&planted).unwrap();
    let secret = b"not a checkpoint of this job".to_vec();
    std::fs::write(planted.join("a.bin"), &secret).unwrap();
    let manifest = json!({
        "name": "planted",
        "files": { "a.bin": [secret.len(), sha256_hex(&secret)] },
        "seq": 0,
        "created_unix_s": 0,
    });
    std::fs::write(planted.join("MANIFEST.json"), manifest.to_string()).unwrap();
    let token = "fuzz-coordinator-token-0123456789".to_string();
    let log = dir.join("coordinator.log");
    let (child, url) = common::coordinator(&dir, "127.0.0.1:0", &token, false, &log);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    Coordinator {
        dir,
        child: Mutex::new(common::Reap(child)),
        url,
        token,
        planted,
        log,
        rt,
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.0.kill();
            let _ = c.0.wait();
        }
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A well-formed store name (what the coordinator may serve).
fn valid_store_name(name: &str) -> bool {
    !(name.is_empty() || name.contains(['/', '\\', '\0']) || name.starts_with('.'))
}

#[test]
fn grpc() {
    run_target("grpc", 0.1, || {
        let c = start_coordinator();
        let check = move |dir: &Path| check_grpc(dir, &c);
        (grpc_requests(), check)
    });
}

/// Every hostile request gets an error status (the right one where the protocol says which),
/// and the coordinator stays up, answering `Status`.
fn check_grpc(dir: &Path, c: &Coordinator) -> Result<(), String> {
    let requests: Vec<Request> =
        serde_json::from_slice(&std::fs::read(dir.join("requests.json")).unwrap())
            .map_err(|e| format!("requests.json: {e}"))?;
    let r = c.rt.block_on(async {
        let mut client = connect(&c.url).await?;
        let status = send_status(&mut client, &c.token).await?;
        let (job, generation) = (status.job_id.clone(), status.generation);
        for (i, r) in requests.iter().enumerate() {
            tokio::time::timeout(
                Duration::from_secs(20),
                one_call(&mut client, c, r, &job, generation),
            )
            .await
            .map_err(|_| format!("request {i} got no answer within 20 s: {r:?}"))?
            .map_err(|e| format!("request {i} ({r:?}): {e}"))?;
        }
        send_status(&mut client, &c.token).await.map(|_| ())
    });
    let exited = c.child.lock().unwrap().0.try_wait().ok().flatten();
    let r = match exited {
        Some(st) => Err(format!("the coordinator exited ({st})")),
        None => r,
    };
    if r.is_err() {
        let log = std::fs::read_to_string(&c.log).unwrap_or_default();
        let tail: String = log
            .chars()
            .rev()
            .take(3000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return r.map_err(|e| format!("{e}\ncoordinator log (end):\n{tail}"));
    }
    Ok(())
}

/// A client of the coordinator at `url`: over mutual TLS with the test jobs' certificates
/// (tests/common's `shared_tls`) when the URL is `https`.
async fn connect(url: &str) -> Result<Client, String> {
    let err = |e: &dyn fmt::Display| format!("connecting to {url}: {e}");
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| err(&e))?
        .connect_timeout(Duration::from_secs(5));
    if url.starts_with("https://") {
        let security = tandem::tls::Security::from_args(
            Some(&common::shared_tls()),
            false,
            tandem::tls::Role::Worker,
        )
        .map_err(|e| err(&e))?;
        if let Some(tls) = security.client_config(None).map_err(|e| err(&e))? {
            endpoint = endpoint.tls_config(tls).map_err(|e| err(&e))?;
        }
    }
    Ok(Client::new(endpoint.connect().await.map_err(|e| err(&e))?))
}

async fn send_status(
    client: &mut Client,
    token: &str,
) -> Result<tandem::proto::StatusResponse, String> {
    let mut req = tonic::Request::new(tandem::proto::StatusRequest {});
    req.metadata_mut()
        .insert(tandem::proto::TOKEN_HEADER, token.parse().unwrap());
    client
        .status(req)
        .await
        .map(|r| r.into_inner())
        .map_err(|e| format!("the coordinator no longer answers Status: {e}"))
}

fn with_token<T>(msg: T, token: &Token, right: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let value = match token {
        Token::Right => Some(right),
        Token::Wrong(w) => Some(w.as_str()),
        Token::Missing => None,
    };
    if let Some(v) = value.and_then(|v| v.parse().ok()) {
        req.metadata_mut().insert(tandem::proto::TOKEN_HEADER, v);
    }
    req
}

// Messages are built with `..Default::default()` even where every field is set: the protocol
// gains fields, and this test sets those it means.
#[allow(clippy::needless_update)]
async fn one_call(
    client: &mut Client,
    c: &Coordinator,
    r: &Request,
    job: &str,
    generation: u64,
) -> Result<(), String> {
    use tandem::proto;
    use tonic::Code;
    let name_of = |s: &str| s.replace("$PLANTED", &c.planted.display().to_string());
    let job_of = |j: &Option<String>| j.clone().unwrap_or_else(|| job.to_string());
    let gen_of = |g: &Option<u64>| g.unwrap_or(generation);
    let authed = match &r.token {
        Token::Right => true,
        Token::Wrong(w) => w == &c.token,
        Token::Missing => false,
    };
    // What the protocol says a request must get, where it says (`None`: any answer).
    let job_gen = |j: &Option<String>, g: &Option<u64>| -> Option<Code> {
        if job_of(j) != job {
            Some(Code::PermissionDenied)
        } else if gen_of(g) != generation {
            Some(Code::FailedPrecondition)
        } else {
            None
        }
    };
    let (got, want): (Result<(), tonic::Status>, Option<Code>) = match &r.call {
        Call::Raw(bytes) => {
            let addr = c
                .url
                .trim_start_matches("http://")
                .trim_start_matches("https://");
            if let Ok(mut s) = TcpStream::connect(addr) {
                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(bytes);
            }
            return Ok(());
        }
        Call::Manifest(bytes) => {
            static N: AtomicUsize = AtomicUsize::new(0);
            let name = format!("fuzz-manifest-{}", N.fetch_add(1, Ordering::Relaxed));
            let dir = c.dir.join("state/checkpoints").join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("MANIFEST.json"), bytes).unwrap();
            std::fs::write(dir.join("a.bin"), b"abc").unwrap();
            // Files the manifest names outside its checkpoint must not be read.
            let outside = serde_json::from_slice::<Value>(bytes)
                .ok()
                .and_then(|v| v["files"].as_object().cloned())
                .is_some_and(|f| {
                    f.keys()
                        .any(|k| !valid_store_name(k) || k == "MANIFEST.json")
                });
            let msg = proto::GetCheckpointRequest {
                job_id: job.to_string(),
                generation,
                name,
                ..Default::default()
            };
            let got = match client
                .get_checkpoint(with_token(msg, &r.token, &c.token))
                .await
            {
                Ok(resp) => drain(resp.into_inner()).await,
                Err(e) => Err(e),
            };
            let _ = std::fs::remove_dir_all(&dir);
            if got.is_ok() && authed && outside {
                return Err("served a checkpoint whose manifest names files outside it".into());
            }
            (got, None)
        }
        Call::Status => (
            client
                .status(with_token(proto::StatusRequest {}, &r.token, &c.token))
                .await
                .map(drop),
            None,
        ),
        Call::Join {
            protocol_version,
            job: j,
            worker_id,
            ring_addr,
            threads,
            device,
        } => {
            let j2 = j.clone().unwrap_or_default();
            let want = if *protocol_version != proto::PROTOCOL_VERSION {
                Some(Code::FailedPrecondition)
            } else if !j2.is_empty() && j2 != job {
                Some(Code::PermissionDenied)
            } else if ring_addr.is_empty() {
                Some(Code::InvalidArgument)
            } else {
                None
            };
            let msg = proto::JoinRequest {
                protocol_version: *protocol_version,
                job_id: j2,
                worker_id: worker_id.clone(),
                ring_addr: ring_addr.clone(),
                threads: *threads,
                device: device.clone(),
                ..Default::default()
            };
            // A stream's status may follow its headers: an accepted join stays open (no
            // directive comes while no generation forms), a refused one ends with its status.
            let got = match client.join(with_token(msg, &r.token, &c.token)).await {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    match tokio::time::timeout(Duration::from_millis(150), stream.message()).await {
                        Ok(Err(status)) => Err(status),
                        _ => Ok(()),
                    }
                }
                Err(e) => Err(e),
            };
            (got, want)
        }
        Call::Progress {
            job: j,
            generation: g,
            rank,
            stage_index,
            step,
            done,
            error,
            metrics_json,
            steps,
        } => {
            let msg = proto::ProgressReport {
                job_id: job_of(j),
                generation: gen_of(g),
                rank: *rank,
                stage_index: *stage_index,
                step: *step,
                done: *done,
                error: error.clone(),
                metrics_json: metrics_json.clone(),
                steps: (0..*steps)
                    .map(|s| proto::StepRecord {
                        step: u64::from(s),
                        loss: f32::NAN,
                        ..Default::default()
                    })
                    .collect(),
                loss: f32::INFINITY,
                ..Default::default()
            };
            // No rank is a member while no generation runs: always refused.
            let want = job_gen(j, g).unwrap_or(Code::FailedPrecondition);
            (
                client
                    .report_progress(with_token(msg, &r.token, &c.token))
                    .await
                    .map(drop),
                Some(want),
            )
        }
        Call::FetchShard {
            job: j,
            generation: g,
            shard_id,
        } => {
            let msg = proto::FetchShardRequest {
                job_id: job_of(j),
                generation: gen_of(g),
                shard_id: *shard_id,
                ..Default::default()
            };
            let got = match client
                .fetch_shard(with_token(msg, &r.token, &c.token))
                .await
            {
                Ok(resp) => drain(resp.into_inner()).await,
                Err(e) => Err(e),
            };
            (got, job_gen(j, g))
        }
        Call::FetchStageFile {
            job: j,
            generation: g,
            stage_index,
            role,
        } => {
            let msg = proto::FetchStageFileRequest {
                job_id: job_of(j),
                generation: gen_of(g),
                stage_index: *stage_index,
                role: role.clone(),
                ..Default::default()
            };
            let got = match client
                .fetch_stage_file(with_token(msg, &r.token, &c.token))
                .await
            {
                Ok(resp) => drain(resp.into_inner()).await,
                Err(e) => Err(e),
            };
            // The job pre-trains only: no stage has files.
            (got, Some(job_gen(j, g).unwrap_or(Code::NotFound)))
        }
        Call::PutCheckpoint {
            job: j,
            generation: g,
            chunks,
        } => {
            let msgs: Vec<proto::CheckpointChunk> = chunks
                .iter()
                .map(|ch| proto::CheckpointChunk {
                    job_id: job_of(j),
                    generation: gen_of(g),
                    name: name_of(&ch.name),
                    file: ch.file.clone(),
                    data: ch.data.clone(),
                    sha256: if ch.right_sha {
                        sha256_hex(&ch.data)
                    } else {
                        "0".repeat(64)
                    },
                    last_of_file: ch.last_of_file,
                    ..Default::default()
                })
                .collect();
            let want = match chunks.first() {
                None => Some(Code::InvalidArgument),
                Some(_) => job_gen(j, g),
            };
            let got = client
                .put_checkpoint(with_token(tokio_stream::iter(msgs), &r.token, &c.token))
                .await
                .map(drop);
            if let (Ok(()), Some(first)) = (&got, chunks.first()) {
                if !valid_store_name(&name_of(&first.name)) {
                    return Err(format!(
                        "a checkpoint named {:?} was stored",
                        name_of(&first.name)
                    ));
                }
            }
            (got, want)
        }
        Call::GetCheckpoint {
            job: j,
            generation: g,
            name,
        } => {
            let name = name_of(name);
            let msg = proto::GetCheckpointRequest {
                job_id: job_of(j),
                generation: gen_of(g),
                name: name.clone(),
                ..Default::default()
            };
            let got = match client
                .get_checkpoint(with_token(msg, &r.token, &c.token))
                .await
            {
                Ok(resp) => drain(resp.into_inner()).await,
                Err(e) => Err(e),
            };
            if got.is_ok() && authed && !valid_store_name(&name) {
                return Err(format!(
                    "served a checkpoint named {name:?}, outside the store"
                ));
            }
            (got, job_gen(j, g))
        }
    };
    if matches!(&r.token, Token::Wrong(w) if w.len() > 8 << 10) {
        // Past HTTP/2's header limit: refused before the service sees it, with some error.
        return match got {
            Ok(()) => Err("answered OK with a wrong token".into()),
            Err(_) => Ok(()),
        };
    }
    if got.is_ok() {
        accepted();
    }
    let want = if authed {
        want
    } else {
        Some(Code::Unauthenticated)
    };
    match (want, got) {
        (Some(code), Ok(())) => Err(format!("answered OK, expected {code:?}")),
        (Some(code), Err(s)) if s.code() != code => Err(format!(
            "answered {:?} ({}), expected {code:?}",
            s.code(),
            s.message()
        )),
        _ => Ok(()),
    }
}

async fn drain<T>(mut s: tonic::Streaming<T>) -> Result<(), tonic::Status> {
    while s.message().await?.is_some() {}
    Ok(())
}
