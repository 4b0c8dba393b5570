//! Checkpoints on the coordinator's disk: written to a temporary directory with a per-file
//! SHA-256 manifest, fsynced and renamed into place; the last N kept; a corrupt one skipped.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::train::checkpoint::{sha256_hex, Files, MANIFEST};
use crate::util::{self, plain_file_name};

/// Checkpoints on the coordinator's disk: `root/<name>/{files…, MANIFEST.json}`.
pub struct CheckpointStore {
    root: PathBuf,
    keep: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    name: String,
    /// file → (bytes, sha256)
    files: BTreeMap<String, (u64, String)>,
    /// Commit order: one more than the newest checkpoint present when this one was written.
    seq: u64,
    created_unix_s: u64,
}

impl CheckpointStore {
    pub fn new(root: PathBuf, keep: usize) -> Result<Self> {
        std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        Ok(CheckpointStore {
            root,
            keep: keep.max(1),
        })
    }

    /// Writes a checkpoint atomically: files into `.tmp-<name>`, each fsynced, a manifest of
    /// checksums, then one rename. Older checkpoints beyond `keep` are removed.
    pub fn commit(&self, name: &str, files: &[(String, Vec<u8>)]) -> Result<PathBuf> {
        let hashes: Vec<String> = files.iter().map(|(_, b)| sha256_hex(b)).collect();
        self.commit_hashed(name, files, &hashes)
    }

    /// [`Self::commit`] with each file's SHA-256 already known (verified on arrival), so the
    /// manifest does not hash the bytes again.
    pub fn commit_hashed(
        &self,
        name: &str,
        files: &[(String, Vec<u8>)],
        hashes: &[String],
    ) -> Result<PathBuf> {
        if hashes.len() != files.len() {
            return Err(Error::Checkpoint {
                path: self.root.clone(),
                msg: format!("{} hashes for {} files", hashes.len(), files.len()),
            });
        }
        if !plain_file_name(name) {
            return Err(Error::Checkpoint {
                path: self.root.clone(),
                msg: format!("invalid checkpoint name {name:?}"),
            });
        }
        let tmp = self.root.join(format!(".tmp-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let seq = self.list_with_seq().last().map(|(s, _)| s + 1).unwrap_or(0);
        let mut manifest = Manifest {
            name: name.into(),
            files: BTreeMap::new(),
            seq,
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        for ((f, bytes), sha) in files.iter().zip(hashes) {
            if !plain_file_name(f) || f == MANIFEST {
                return Err(Error::Checkpoint {
                    path: tmp.clone(),
                    msg: format!("invalid file name {f:?}"),
                });
            }
            util::write_atomic(&tmp.join(f), bytes)?;
            manifest
                .files
                .insert(f.clone(), (bytes.len() as u64, sha.clone()));
        }
        util::write_atomic(
            &tmp.join(MANIFEST),
            &serde_json::to_vec_pretty(&manifest).expect("json"),
        )?;
        let dst = self.root.join(name);
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        if let Ok(d) = std::fs::File::open(&self.root) {
            let _ = d.sync_all();
        }
        self.prune()?;
        Ok(dst)
    }

    /// Committed checkpoints, oldest first.
    pub fn list(&self) -> Vec<String> {
        self.list_with_seq().into_iter().map(|(_, n)| n).collect()
    }

    fn list_with_seq(&self) -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    return None;
                }
                let m: Manifest =
                    serde_json::from_slice(&std::fs::read(e.path().join(MANIFEST)).ok()?).ok()?;
                Some((m.seq, name))
            })
            .collect();
        v.sort();
        v
    }

    /// Removes the oldest checkpoints beyond `keep`; pinned ones (`*-final`, `*-best`,
    /// `*-init`) are kept and not counted.
    fn prune(&self) -> Result<()> {
        let pinned =
            |n: &String| n.ends_with("-final") || n.ends_with("-best") || n.ends_with("-init");
        let all: Vec<String> = self.list().into_iter().filter(|n| !pinned(n)).collect();
        if all.len() > self.keep {
            for old in &all[..all.len() - self.keep] {
                let p = self.root.join(old);
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(())
    }

    /// Reads a checkpoint, verifying every file against the manifest.
    pub fn read(&self, name: &str) -> Result<Vec<(String, Vec<u8>)>> {
        // Names come from requests: only checkpoints of this store are served.
        if !plain_file_name(name) {
            return Err(Error::Checkpoint {
                path: self.root.clone(),
                msg: format!("invalid checkpoint name {name:?}"),
            });
        }
        let dir = self.root.join(name);
        let mpath = dir.join(MANIFEST);
        let bytes = std::fs::read(&mpath).map_err(|e| Error::io(&mpath, e))?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: mpath.clone(),
            source,
        })?;
        let mut out = vec![];
        for (f, (len, sha)) in &m.files {
            if !plain_file_name(f) || f == MANIFEST {
                return Err(Error::Checkpoint {
                    path: mpath.clone(),
                    msg: format!("lists {f:?}, not a file name of the checkpoint"),
                });
            }
            let p = dir.join(f);
            let b = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            if b.len() as u64 != *len || &sha256_hex(&b) != sha {
                return Err(Error::Checkpoint {
                    path: p,
                    msg: format!("checksum mismatch (expected {len} bytes with SHA-256 {sha})"),
                });
            }
            out.push((f.clone(), b));
        }
        Ok(out)
    }

    /// The newest checkpoint whose files all verify; corrupt newer ones are reported and
    /// skipped.
    pub fn latest_good(&self) -> Option<(String, Files)> {
        for name in self.list().into_iter().rev() {
            match self.read(&name) {
                Ok(files) => return Some((name, files)),
                Err(e) => tracing::warn!(
                    "checkpoint {name} is unusable, falling back to an older one: {e}"
                ),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_commits_prunes_and_skips_corrupt() {
        let root = std::env::temp_dir().join(format!("tandem-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let s = CheckpointStore::new(root.clone(), 2).unwrap();
        for i in 0..3 {
            s.commit(&format!("c{i}"), &[("a.bin".into(), vec![i as u8; 10])])
                .unwrap();
        }
        assert_eq!(s.list(), ["c1", "c2"]);
        assert_eq!(s.latest_good().unwrap().0, "c2");
        std::fs::write(root.join("c2/a.bin"), [9u8; 10]).unwrap();
        assert!(s
            .read("c2")
            .unwrap_err()
            .to_string()
            .contains("checksum mismatch"));
        let (name, files) = s.latest_good().unwrap();
        assert_eq!(name, "c1");
        assert_eq!(files[0].1, vec![1u8; 10]);
        assert!(s.commit("../x", &[]).is_err());
        std::fs::remove_dir_all(root).unwrap();
    }
}
