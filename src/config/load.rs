//! Reading a job config: the TOML file (its relative paths made relative to the file's
//! directory), then `TANDEM__…` environment variables, then `--set` overrides, layered with
//! the `config` crate. An error names its source: the file with line and column, the `--set`
//! argument, or the environment.

use std::path::{Component, Path, PathBuf};

use super::{ConfigError, JobConfig};

/// Loads and layers the sources (not yet validated).
pub(super) fn load(path: &Path, overrides: &[String]) -> Result<JobConfig, ConfigError> {
    let load_err = |msg: String| ConfigError::Load {
        path: path.into(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => load_err("no such file".into()),
        _ => load_err(e.to_string()),
    })?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| load_err(toml_error(&text, &e)))?;
    let base = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    resolve_paths(&mut table, &base);
    let file = toml::to_string(&table).map_err(|e| load_err(e.to_string()))?;
    let mut sets = Vec::with_capacity(overrides.len());
    for o in overrides {
        let (k, v) = o
            .split_once('=')
            .ok_or_else(|| ConfigError::BadOverride(o.clone()))?;
        if let Some(msg) = index_out_of_reach(k) {
            return Err(ConfigError::Override {
                arg: o.clone(),
                msg,
            });
        }
        sets.push((o.as_str(), k.trim(), v.trim()));
    }
    let mut cfg = layered(&file, true, &sets).map_err(|e| explain(path, &text, &file, &sets, e))?;
    cfg.make_paths_absolute();
    Ok(cfg)
}

impl JobConfig {
    /// Makes every path absolute against the working directory (those from the file already
    /// are): a config written out again (launch's `STATE_DIR/job.toml`) must mean the same
    /// files wherever it is read from. The same keys as [`resolve_paths`].
    pub fn make_paths_absolute(&mut self) {
        let abs = |p: &Path| clean(&std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
        let fix = |p: &mut PathBuf| *p = abs(p);
        fix(&mut self.job.state_dir);
        self.job.token_file.as_mut().map(fix);
        self.model.config.as_mut().map(fix);
        self.data.tokenizer.as_mut().map(fix);
        for c in &mut self.data.corpus {
            *c = abs(Path::new(c.as_str())).display().to_string();
        }
        for s in &mut self.stages {
            s.train.as_mut().map(fix);
            s.dev.as_mut().map(fix);
            if let Some(d) = s.init_from.as_mut().filter(|d| *d != "previous") {
                *d = abs(Path::new(d.as_str())).display().to_string();
            }
        }
    }
}

/// The largest array index (either way) a `--set` key may use. The config crate grows an
/// array to whatever index it is given, so `stages[4294967296]` would allocate hundreds of GB.
const MAX_SET_INDEX: u64 = 1024;

/// Why `key` (e.g. `stages[1].lr`) indexes beyond [`MAX_SET_INDEX`], if it does.
fn index_out_of_reach(key: &str) -> Option<String> {
    key.split('[').skip(1).find_map(|part| {
        let index = part.split(']').next()?.trim();
        let n: u64 = index.trim_start_matches('-').parse().ok()?;
        (n > MAX_SET_INDEX).then(|| {
            format!("index [{index}] is out of range: a job config has at most {MAX_SET_INDEX} entries in an array")
        })
    })
}

/// The file's text, the environment if `env`, then `sets`, deserialised.
fn layered(file: &str, env: bool, sets: &[(&str, &str, &str)]) -> Result<JobConfig, String> {
    let mut b = config::Config::builder()
        .add_source(config::File::from_str(file, config::FileFormat::Toml));
    if env {
        b = b.add_source(
            config::Environment::with_prefix("TANDEM")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
    }
    for (o, k, v) in sets {
        b = b
            .set_override(*k, *v)
            .map_err(|e| format!("--set {o}: {e}"))?;
    }
    b.build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| e.to_string())
}

/// Finds which source made the layered config fail: the file on its own (parsed by toml, for
/// line numbers and serde's lists of valid values), one `--set`, or the environment.
fn explain(
    path: &Path,
    text: &str,
    file: &str,
    sets: &[(&str, &str, &str)],
    layered_err: String,
) -> ConfigError {
    let file_alone = toml::from_str::<JobConfig>(text);
    let env_vars = std::env::vars().any(|(k, _)| k.starts_with("TANDEM__"));
    if let Err(e) = &file_alone {
        // A key missing from the file may be one an override supplies: then look further.
        let supplied_elsewhere = !sets.is_empty() || env_vars;
        if !supplied_elsewhere || !e.message().starts_with("missing field") {
            return ConfigError::Load {
                path: path.into(),
                msg: toml_error(text, e),
            };
        }
    }
    for s in sets {
        if let Err(e) = layered(file, false, std::slice::from_ref(s)) {
            if file_alone.is_ok() || !e.contains("missing field") {
                let msg = e.strip_prefix(&format!("--set {}: ", s.0)).unwrap_or(&e);
                // serde's own message (it lists an enum's valid values) where the override
                // can be placed in the file's table; the config crate's otherwise.
                let msg = serde_message(text, s.1, s.2).unwrap_or_else(|| msg.to_string());
                return ConfigError::Override {
                    arg: s.0.to_string(),
                    msg,
                };
            }
        }
    }
    ConfigError::Load {
        path: path.into(),
        msg: format!(
            "{layered_err} (with the TANDEM__… environment variables and --set overrides)"
        ),
    }
}

/// What serde says of the file with `key = value` set in it (`stages[0].kind`-style keys), if
/// that makes it fail; None when the key cannot be placed or the result parses.
fn serde_message(text: &str, key: &str, value: &str) -> Option<String> {
    let mut table: toml::Table = toml::from_str(text).ok()?;
    let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let mut at = &mut table;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (name, index) = match part.split_once('[') {
            Some((n, i)) => (n, Some(i.strip_suffix(']')?.parse::<usize>().ok()?)),
            None => (part, None),
        };
        if parts.peek().is_none() && index.is_none() {
            at.insert(name.to_string(), value);
            break;
        }
        let next = at
            .entry(name.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        let next = match index {
            Some(i) => next.as_array_mut()?.get_mut(i)?,
            None => next,
        };
        at = next.as_table_mut()?;
    }
    let e = toml::from_str::<JobConfig>(&toml::to_string(&table).ok()?).err()?;
    Some(format!("{} for key `{key}`", e.message().trim()))
}

/// "line 12, column 8: unknown variant `pretraining`, expected one of `pretrain`, …".
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before[line_start..].chars().count() + 1;
            format!("line {line}, column {column}: {}", e.message().trim())
        }
        None => e.message().trim().to_string(),
    }
}

/// The keys that hold paths. A relative path in the file is relative to the file's
/// directory, as in most tools; `--set` and the environment stay relative to the working
/// directory.
fn resolve_paths(t: &mut toml::Table, base: &Path) {
    let fix = |v: Option<&mut toml::Value>| {
        if let Some(toml::Value::String(s)) = v {
            if Path::new(s.as_str()).is_relative() {
                *s = clean(&base.join(s.as_str())).display().to_string();
            }
        }
    };
    // A corpus entry may be a glob: the directory part must then match itself literally.
    let fix_glob = |v: &mut toml::Value| {
        if let toml::Value::String(s) = v {
            let is_glob = s.contains(['*', '?', '[']);
            if Path::new(s.as_str()).is_relative() && is_glob {
                let dir = glob::Pattern::escape(&clean(base).display().to_string());
                *s = format!("{dir}/{s}");
            } else {
                fix(Some(v));
            }
        }
    };
    if let Some(job) = t.get_mut("job").and_then(toml::Value::as_table_mut) {
        fix(job.get_mut("state_dir"));
        fix(job.get_mut("token_file"));
    }
    if let Some(model) = t.get_mut("model").and_then(toml::Value::as_table_mut) {
        fix(model.get_mut("config"));
    }
    if let Some(data) = t.get_mut("data").and_then(toml::Value::as_table_mut) {
        fix(data.get_mut("tokenizer"));
        if let Some(toml::Value::Array(corpus)) = data.get_mut("corpus") {
            corpus.iter_mut().for_each(fix_glob);
        }
    }
    if let Some(toml::Value::Array(stages)) = t.get_mut("stages") {
        for s in stages.iter_mut().filter_map(toml::Value::as_table_mut) {
            fix(s.get_mut("train"));
            fix(s.get_mut("dev"));
            if s.get("init_from").and_then(toml::Value::as_str) != Some("previous") {
                fix(s.get_mut("init_from"));
            }
        }
    }
}

/// `a/b/../c/./d` → `a/c/d`, without touching the filesystem (the path may not exist yet).
fn clean(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                // `/..` is `/`.
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            c => out.push(c.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tandem-config-load-{name}-{}", std::process::id()))
    }

    const JOB: &str = "[job]\nname = \"t\"\nstate_dir = \"../state\"\n[model]\npreset = \"tiny\"\n\
        [data]\ncorpus = [\"data/*.txt\", \"/abs/corpus\"]\ntokenizer = \"./tok\"\n\
        [[stages]]\nname = \"p\"\nkind = \"pretrain\"\nlr = 1e-3\n\
        [[stages]]\nname = \"f\"\nkind = \"sequence_classification\"\ntrain = \"t.jsonl\"\ndev = \"d/../d.jsonl\"\nlr = 1e-3\n";

    #[test]
    fn relative_paths_in_the_file_are_relative_to_its_directory() {
        let dir = tmp("paths").join("conf");
        let cfg = load(
            &write(&dir, "job.toml", JOB),
            &["stages[1].dev=here.jsonl".into()],
        )
        .unwrap();
        let root = std::path::absolute(&dir).unwrap();
        assert_eq!(cfg.job.state_dir, root.parent().unwrap().join("state"));
        assert_eq!(
            cfg.data.corpus,
            [
                root.join("data/*.txt").display().to_string(),
                "/abs/corpus".into()
            ]
        );
        assert_eq!(cfg.data.tokenizer, Some(root.join("tok")));
        assert_eq!(cfg.stages[1].train, Some(root.join("t.jsonl")));
        // --set is relative to the working directory.
        let here = std::path::absolute("here.jsonl").unwrap();
        assert_eq!(cfg.stages[1].dev, Some(here));
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn errors_name_their_source() {
        let dir = tmp("errors");
        let p = write(
            &dir,
            "job.toml",
            &JOB.replace("kind = \"pretrain\"", "kind = \"pretraining\""),
        );
        let e = load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains("job.toml: line 11, column 8: unknown variant `pretraining`, expected one of `pretrain`, `sequence_classification`"), "{e}");
        let p = write(&dir, "job.toml", JOB);
        let e = load(
            &p,
            &["stages[0].lr=1e-4".into(), "stages[0].max_step=30".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("--set stages[0].max_step=30: ") && e.contains("max_step"),
            "{e}"
        );
        let e = load(&p, &["stages[0].kind=pretraining".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--set stages[0].kind=pretraining: unknown variant `pretraining`, expected one of `pretrain`"),
            "{e}"
        );
        // A key the file lacks but a --set gives is no error.
        let p = write(
            &dir,
            "job.toml",
            &JOB.replace(
                "name = \"p\"\nkind = \"pretrain\"\nlr = 1e-3",
                "name = \"p\"\nkind = \"pretrain\"",
            ),
        );
        load(&p, &["stages[0].lr=1e-4".into()]).unwrap();
        let e = load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains("line 9, column 1: missing field `lr`"), "{e}");
        let p = write(&dir, "job.toml", "[job]\nname = 3\n");
        let e = load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains("line 2, column 8"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn clean_folds_dots_lexically() {
        assert_eq!(clean(Path::new("/a/b/../c/./d")), Path::new("/a/c/d"));
        assert_eq!(clean(Path::new("/a/../../b")), Path::new("/b"));
        assert_eq!(clean(Path::new("../x")), Path::new("../x"));
    }
}
