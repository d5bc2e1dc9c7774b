//! hostPath volumes: the path is checked (absolute, clean) and its `type` enforced as
//! the kubelet does (`DirectoryOrCreate`, `Directory`, `FileOrCreate`, `File`,
//! `Socket`, `CharDevice`, `BlockDevice`; empty = no check).

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use super::VolumeError;

/// What a hostPath turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPathKind {
    /// A directory.
    Directory,
    /// Anything else (file, socket, device), or absent with no type check.
    Other,
}

/// Checks `path` against `type_` (creating it for the `…OrCreate` types).
pub fn prepare(volume: &str, path: &str, type_: Option<&str>) -> Result<HostPathKind, VolumeError> {
    let err = |reason: String| VolumeError::HostPath {
        volume: volume.to_owned(),
        path: path.to_owned(),
        reason,
    };
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(err("must be an absolute path".into()));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(err("must not contain '..'".into()));
    }
    let meta = std::fs::metadata(p);
    let t = type_.unwrap_or("");
    let kind_of = |m: &std::fs::Metadata| {
        if m.is_dir() {
            HostPathKind::Directory
        } else {
            HostPathKind::Other
        }
    };
    match t {
        "" => Ok(meta.as_ref().map_or(HostPathKind::Other, kind_of)),
        "DirectoryOrCreate" => match meta {
            Ok(m) if m.is_dir() => Ok(HostPathKind::Directory),
            Ok(_) => Err(err("exists and is not a directory".into())),
            Err(_) => {
                std::fs::create_dir_all(p).map_err(|e| err(format!("creating it: {e}")))?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| err(format!("setting its mode: {e}")))?;
                Ok(HostPathKind::Directory)
            }
        },
        "Directory" => match meta {
            Ok(m) if m.is_dir() => Ok(HostPathKind::Directory),
            Ok(_) => Err(err("is not a directory".into())),
            Err(_) => Err(err("does not exist".into())),
        },
        "FileOrCreate" => match meta {
            Ok(m) if m.is_file() => Ok(HostPathKind::Other),
            Ok(_) => Err(err("exists and is not a file".into())),
            Err(_) => {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(p)
                    .map_err(|e| err(format!("creating it: {e}")))?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644))
                    .map_err(|e| err(format!("setting its mode: {e}")))?;
                Ok(HostPathKind::Other)
            }
        },
        "File" | "Socket" | "CharDevice" | "BlockDevice" => {
            let m = meta.map_err(|_| err("does not exist".into()))?;
            let ft = m.file_type();
            let ok = match t {
                "File" => ft.is_file(),
                "Socket" => ft.is_socket(),
                "CharDevice" => ft.is_char_device(),
                _ => ft.is_block_device(),
            };
            if ok {
                Ok(HostPathKind::Other)
            } else {
                Err(err(format!("is not a {t}")))
            }
        }
        other => Err(err(format!("unknown hostPath type {other:?}"))),
    }
}

/// `path` as a `PathBuf` (after [`prepare`] accepted it).
pub fn host_path(path: &str) -> PathBuf {
    PathBuf::from(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_enforced() {
        let base = std::env::temp_dir().join(format!("vzk-hostpath-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let s = |p: &Path| p.display().to_string();
        let dir = base.join("new/dir");
        assert_eq!(
            prepare("v", &s(&dir), Some("DirectoryOrCreate")).ok(),
            Some(HostPathKind::Directory)
        );
        assert!(dir.is_dir());
        assert_eq!(
            prepare("v", &s(&dir), Some("Directory")).ok(),
            Some(HostPathKind::Directory)
        );
        let file = base.join("new/file");
        assert_eq!(
            prepare("v", &s(&file), Some("FileOrCreate")).ok(),
            Some(HostPathKind::Other)
        );
        assert!(file.is_file());
        assert!(prepare("v", &s(&file), Some("File")).is_ok());
        assert!(prepare("v", &s(&file), Some("Directory")).is_err());
        assert!(prepare("v", &s(&dir), Some("File")).is_err());
        assert!(prepare("v", &s(&file), Some("Socket")).is_err());
        assert!(prepare("v", &s(&base.join("absent")), Some("Directory")).is_err());
        assert!(prepare("v", &s(&file), Some("DirectoryOrCreate")).is_err());
        assert!(prepare("v", "relative/x", None).is_err());
        assert!(prepare("v", "/a/../etc", None).is_err());
        assert!(prepare("v", "/dev/null", Some("CharDevice")).is_ok());
        let e = prepare("v", &s(&file), Some("Bogus"))
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("unknown hostPath type")));
        let _ = std::fs::remove_dir_all(&base);
    }
}
