//! The state file: the history a drain leaves for the next start (`--state-dir`), so a
//! clean restart under supervisord or systemd loses nothing a client could resume.
//!
//! Saving is atomic: a temporary file is written and fsynced, renamed over the old name,
//! and the directory fsynced, so a crash mid-save leaves the previous file or none,
//! never half of one. Loading removes the file once read: after a `kill -9` there is no
//! file, topics start new epochs, and resumes answer `recovered:false` (honest, never
//! silent). A file that cannot be used (corrupt, another format version) is logged and
//! renamed aside with a `.bad-<unix time>` suffix, never deleted, and herald starts fresh.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use log::{info, warn};

use crate::pubsub::history::{self, History, Limits};

/// The file's name in `--state-dir`. The configured port is part of it, so several
/// processes sharing one directory (supervisord's `numprocs`) keep apart.
pub fn path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!("herald-{port}.history"))
}

/// The history to start with: the saved one if there is a usable file, else empty.
pub fn load(file: &Path, limits: Limits, now: Instant) -> History {
    let seed = history::wall_clock_seed();
    let bytes = match fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            info!(
                "no saved history at {}: topics start new epochs",
                file.display()
            );
            return History::new(limits, seed);
        }
        Err(e) => {
            warn!("cannot read {}: {e}; starting without it", file.display());
            return History::new(limits, seed);
        }
    };
    match History::restore(&bytes, limits, seed, now) {
        Ok(history) => {
            // Used once: a later crash must not bring this history back as if current.
            if let Err(e) = fs::remove_file(file) {
                warn!("cannot remove {} after loading it: {e}", file.display());
            }
            info!(
                "loaded history from {}: {} topics, {} messages",
                file.display(),
                history.topics(),
                history.messages()
            );
            history
        }
        Err(e) => {
            let aside = set_aside(file);
            warn!(
                "{}: {e}; moved to {} and starting without it",
                file.display(),
                aside.display()
            );
            History::new(limits, seed)
        }
    }
}

fn set_aside(file: &Path) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut name = file.as_os_str().to_owned();
    name.push(format!(".bad-{secs}"));
    let aside = PathBuf::from(name);
    if let Err(e) = fs::rename(file, &aside) {
        warn!("cannot move {} aside: {e}", file.display());
    }
    aside
}

/// Write `bytes` to `file` atomically.
pub fn save(file: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, file)?;
    // The rename is durable only once the directory entry is.
    if let Some(dir) = file.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
