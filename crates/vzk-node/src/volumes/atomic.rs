//! Atomic volume content, as the kubelet's `AtomicWriter` writes it.
//!
//! A target directory holds:
//! * `..<timestamp>.<n>/`: one complete version of the payload;
//! * `..data -> ..<timestamp>.<n>`: the current version, swapped with `rename(2)`;
//! * one user-visible symlink per top-level entry: `<name> -> ..data/<name>`.
//!
//! A reader opening `<dir>/<file>` resolves `..data` once, so it sees either the old
//! or the new version in full, never a half-written file. Writing the same payload
//! again changes nothing on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The symlink naming the current version.
pub const DATA_DIR: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// One file of a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileData {
    /// Its content.
    pub data: Vec<u8>,
    /// Its permission bits (e.g. `0o644`).
    pub mode: u32,
}

/// Relative path → file. Paths may have several components (`a/b/c`).
pub type Payload = BTreeMap<String, FileData>;

/// Why a payload could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AtomicWriteError {
    /// A payload path is not a clean relative path.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The path.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// A file system operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AtomicWriteError {
    let path = path.to_owned();
    move |source| AtomicWriteError::Io { what, path, source }
}

/// Checks a payload path the kubelet's way: relative, no `..` component, not starting
/// with `..`, at most 4096 bytes and 255 bytes per component.
pub fn validate_path(path: &str) -> Result<(), AtomicWriteError> {
    let bad = |reason| AtomicWriteError::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    if path.is_empty() {
        return Err(bad("empty"));
    }
    if path.len() > 4096 {
        return Err(bad("longer than 4096 bytes"));
    }
    if path.starts_with("..") {
        return Err(bad("must not start with '..'"));
    }
    let p = Path::new(path);
    if p.is_absolute() {
        return Err(bad("must be relative"));
    }
    for c in p.components() {
        match c {
            Component::Normal(s) if s.len() > 255 => {
                return Err(bad("a component is longer than 255 bytes"));
            }
            Component::Normal(_) | Component::CurDir => {}
            _ => return Err(bad("must not contain '..'")),
        }
    }
    Ok(())
}

/// The first component of a payload path: the user-visible entry.
fn top(path: &str) -> &str {
    path.trim_start_matches("./")
        .split('/')
        .find(|s| !s.is_empty() && *s != ".")
        .unwrap_or(path)
}

/// Whether `dir` already holds exactly `payload` as its current version.
fn current_matches(dir: &Path, payload: &Payload) -> bool {
    let data = dir.join(DATA_DIR);
    let Ok(target) = std::fs::read_link(&data) else {
        return false;
    };
    let version = dir.join(target);
    for (path, f) in payload {
        let p = version.join(path);
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            return false;
        };
        if !meta.is_file() || meta.permissions().mode() & 0o7777 != f.mode & 0o7777 {
            return false;
        }
        if std::fs::read(&p).ok().as_deref() != Some(f.data.as_slice()) {
            return false;
        }
        if std::fs::symlink_metadata(dir.join(top(path))).is_err() {
            return false;
        }
    }
    // No extra files in the version.
    let mut count = 0usize;
    let mut stack = vec![version];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            return false;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => count += 1,
                Err(_) => return false,
            }
        }
    }
    count == payload.len()
}

fn new_version_dir(dir: &Path) -> Result<PathBuf, AtomicWriteError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let stamp = chrono::Utc::now().format("%Y_%m_%d_%H_%M_%S");
    loop {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = dir.join(format!("..{stamp}.{}{n:04}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                    .map_err(io("setting the mode of", &p))?;
                return Ok(p);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("creating", &p)(e)),
        }
    }
}

/// Writes `payload` into `dir` atomically. Returns whether anything changed.
pub fn write(dir: &Path, payload: &Payload) -> Result<bool, AtomicWriteError> {
    for path in payload.keys() {
        validate_path(path)?;
    }
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    if current_matches(dir, payload) {
        return Ok(false);
    }
    let old = std::fs::read_link(dir.join(DATA_DIR)).ok();
    let old_tops: BTreeSet<String> = old
        .as_ref()
        .and_then(|o| std::fs::read_dir(dir.join(o)).ok())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();

    // 1. The new version, complete, before anyone can see it.
    let version = new_version_dir(dir)?;
    let written = (|| {
        for (path, f) in payload {
            let p = version.join(path);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
            }
            let mut file = std::fs::File::create(&p).map_err(io("creating", &p))?;
            file.write_all(&f.data).map_err(io("writing", &p))?;
            file.sync_all().map_err(io("syncing", &p))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode & 0o7777))
                .map_err(io("setting the mode of", &p))?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&version);
        return Err(e);
    }
    let version_name = version
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| version.clone());

    // 2. Swap `..data` to it with one rename.
    let tmp = dir.join(DATA_TMP);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&version_name, &tmp).map_err(io("linking", &tmp))?;
    let data = dir.join(DATA_DIR);
    std::fs::rename(&tmp, &data).map_err(io("swapping", &data))?;

    // 3. User-visible links for new entries; stale ones removed.
    let new_tops: BTreeSet<String> = payload.keys().map(|p| top(p).to_owned()).collect();
    for t in &new_tops {
        let link = dir.join(t);
        let want = Path::new(DATA_DIR).join(t);
        if std::fs::read_link(&link).ok().as_deref() == Some(want.as_path()) {
            continue;
        }
        let tmp = dir.join(format!("{DATA_TMP}.{t}"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&want, &tmp).map_err(io("linking", &tmp))?;
        std::fs::rename(&tmp, &link).map_err(io("linking", &link))?;
    }
    for t in old_tops.difference(&new_tops) {
        let link = dir.join(t);
        // Only our own links: never follow or remove anything else.
        if std::fs::read_link(&link).is_ok_and(|l| l.starts_with(DATA_DIR)) {
            std::fs::remove_file(&link).map_err(io("removing", &link))?;
        }
    }

    // 4. The old version goes.
    if let Some(o) = old {
        let p = dir.join(&o);
        if o != version_name && o.to_string_lossy().starts_with("..") {
            std::fs::remove_dir_all(&p).map_err(io("removing", &p))?;
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "vzk-atomic-{tag}-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn file(s: &str, mode: u32) -> FileData {
        FileData {
            data: s.as_bytes().to_vec(),
            mode,
        }
    }

    fn versions(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("..") && n != DATA_DIR)
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn paths_are_checked_like_the_kubelet() {
        for ok in ["a", "a/b/c", "a..b", "x/..y"] {
            assert!(validate_path(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/abs", "..", "../x", "a/../b", "..data", "..hidden"] {
            assert!(validate_path(bad).is_err(), "{bad}");
        }
        assert!(validate_path(&"x".repeat(256)).is_err());
    }

    #[test]
    fn writes_links_modes_and_swaps_versions() {
        let dir = tmpdir("swap");
        let mut p = Payload::new();
        p.insert("token".into(), file("t1", 0o600));
        p.insert("sub/dir/ca.crt".into(), file("ca", 0o644));
        assert!(write(&dir, &p).unwrap_or(false));
        assert_eq!(
            std::fs::read_to_string(dir.join("token")).ok().as_deref(),
            Some("t1")
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("sub/dir/ca.crt"))
                .ok()
                .as_deref(),
            Some("ca")
        );
        assert_eq!(
            std::fs::read_link(dir.join("token")).ok(),
            Some(PathBuf::from("..data/token"))
        );
        assert_eq!(
            std::fs::read_link(dir.join("sub")).ok(),
            Some(PathBuf::from("..data/sub"))
        );
        let mode = std::fs::metadata(dir.join("token")).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o600));
        let v1 = versions(&dir);
        assert_eq!(v1.len(), 1, "{v1:?}");

        // Same payload: nothing changes.
        assert!(!write(&dir, &p).unwrap_or(true));
        assert_eq!(versions(&dir), v1);

        // New content: a new version, the old one removed, stale entries unlinked.
        let mut p2 = Payload::new();
        p2.insert("token".into(), file("t2", 0o644));
        assert!(write(&dir, &p2).unwrap_or(false));
        let v2 = versions(&dir);
        assert_eq!(v2.len(), 1, "{v2:?}");
        assert_ne!(v1, v2);
        assert_eq!(
            std::fs::read_to_string(dir.join("token")).ok().as_deref(),
            Some("t2")
        );
        assert!(std::fs::symlink_metadata(dir.join("sub")).is_err());
        // A mode change alone is a change.
        p2.insert("token".into(), file("t2", 0o400));
        assert!(write(&dir, &p2).unwrap_or(false));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_path_writes_nothing() {
        let dir = tmpdir("bad");
        let mut p = Payload::new();
        p.insert("ok".into(), file("x", 0o644));
        p.insert("../escape".into(), file("x", 0o644));
        assert!(matches!(
            write(&dir, &p),
            Err(AtomicWriteError::InvalidPath { .. })
        ));
        assert!(!dir.exists());
    }

    /// A reader racing the writer only ever sees a complete old or new file.
    #[test]
    fn readers_never_see_a_half_written_file() {
        let dir = tmpdir("race");
        let size = 512 * 1024;
        let version = |c: u8| {
            let mut p = Payload::new();
            p.insert(
                "big".into(),
                FileData {
                    data: vec![c; size],
                    mode: 0o644,
                },
            );
            p
        };
        assert!(write(&dir, &version(b'a')).is_ok());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (dir, stop) = (dir.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                let mut seen = BTreeSet::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(d) = std::fs::read(dir.join("big")) {
                        assert_eq!(d.len(), size, "short read");
                        let c = d[0];
                        assert!(d.iter().all(|&x| x == c), "mixed content");
                        seen.insert(c);
                        reads += 1;
                    }
                }
                (reads, seen)
            })
        };
        for i in 0..60u8 {
            assert!(write(&dir, &version(b'a' + i % 3)).is_ok());
        }
        stop.store(true, Ordering::Relaxed);
        let (reads, _seen) = reader.join().unwrap_or_default();
        assert!(reads > 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
