//! One coordinator per state dir: two coordinators on one job would both write its record,
//! checkpoints and summary. The lock is an `flock` on `state_dir/coordinator.lock`, so the
//! kernel releases it when the process ends in any way (no stale lock after a kill -9).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::Context;

/// Held for the coordinator's lifetime.
pub(crate) struct StateLock(#[allow(dead_code)] std::fs::File);

impl StateLock {
    /// Takes the state dir's lock, or says which process holds it.
    pub(crate) fn acquire(state_dir: &Path) -> anyhow::Result<StateLock> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let path = state_dir.join("coordinator.lock");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on an open fd has no memory-safety preconditions.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::bail!(
                "another coordinator ({}) runs the job in {}: one coordinator per state dir",
                match holder.trim() {
                    "" => "pid unknown".to_string(),
                    pid => format!("pid {pid}"),
                },
                state_dir.display()
            );
        }
        f.set_len(0)?;
        write!(f, "{}", std::process::id())?;
        Ok(StateLock(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        // flock locks belong to open files: a second open in this process conflicts too.
        let e = StateLock::acquire(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("another coordinator") && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(first);
        StateLock::acquire(dir.path()).unwrap();
    }
}
