//! The write side of the data dir: an upload is staged in a temporary file next to its target and replaces the
//! override atomically; a removal unlinks the override so the bundled copy is served again. Nothing here ever writes
//! to the bundled dir.
//!
//! Atomicity: the staged file is `.upload-*` (a name [`crate::validate_name`] refuses, so no request can fetch it)
//! in the target's own directory; [`Staged::commit`] fsyncs it, sets its mode, renames it over the target and fsyncs
//! the directory. Dropping a [`Staged`] without committing deletes the temporary file, so a failed or abandoned
//! upload leaves the previous file untouched.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

use crate::store::{AssetKind, AssetStore};

/// Prefix of staged uploads.
pub const STAGING_PREFIX: &str = ".upload-";

/// Why a write to the data dir failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The target name is taken by a directory: an upload cannot replace it and a removal does not remove it.
    #[error("{subdir}/{name} is a directory in the data dir, not a file")]
    IsDirectory { subdir: &'static str, name: String },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// An upload in progress: write the content to [`Staged::file`], then [`Staged::commit`].
#[derive(Debug)]
pub struct Staged {
    tmp: NamedTempFile,
    dir: PathBuf,
    target: PathBuf,
    mode: u32,
    kind: AssetKind,
    name: String,
}

impl AssetStore {
    /// Creates `<DataDir>/<subdir>/` if needed (a symlinked one is refused: the server would not serve from it) and a
    /// staging file in it for `name`, which must already be validated for `kind`. A directory of that name is
    /// refused here, before any content is transferred ([`WriteError::IsDirectory`]). Blocking.
    pub fn stage(&self, kind: AssetKind, name: &str) -> Result<Staged, WriteError> {
        let dir = self.override_dir(kind)?;
        let target = dir.join(name);
        if is_dir(&target)? {
            return Err(WriteError::IsDirectory { subdir: kind.subdir(), name: name.to_string() });
        }
        let tmp = tempfile::Builder::new().prefix(STAGING_PREFIX).tempfile_in(&dir)?;
        Ok(Staged { tmp, target, dir, mode: kind.mode_for(name), kind, name: name.to_string() })
    }

    /// Removes the data-dir override of `(kind, name)`; `Ok(false)` when there is none. A directory of that name is
    /// never removed ([`WriteError::IsDirectory`]). Blocking.
    pub fn remove(&self, kind: AssetKind, name: &str) -> Result<bool, WriteError> {
        let dir = self.data_dir().join(kind.subdir());
        let file = dir.join(name);
        match fs::symlink_metadata(&file) {
            Ok(meta) if meta.is_dir() => Err(WriteError::IsDirectory { subdir: kind.subdir(), name: name.to_string() }),
            Ok(_) => {
                fs::remove_file(&file)?;
                sync_dir(&dir)?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes staging files a killed process left behind (`.upload-*` in the override dirs; nothing else, and
    /// nothing that is not a regular file). Run at start, before anything is staged. Returns how many were removed.
    pub fn remove_stale_staging(&self) -> io::Result<usize> {
        let mut removed = 0;
        for kind in AssetKind::ALL.into_iter().chain([AssetKind::AgentBuild]) {
            let dir = self.data_dir().join(kind.subdir());
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let stale = entry.file_name().to_str().is_some_and(|n| n.starts_with(STAGING_PREFIX))
                    && entry.file_type()?.is_file();
                if stale {
                    fs::remove_file(entry.path())?;
                    removed += 1;
                }
            }
            if removed > 0 {
                sync_dir(&dir)?;
            }
        }
        Ok(removed)
    }

    fn override_dir(&self, kind: AssetKind) -> io::Result<PathBuf> {
        let dir = self.data_dir().join(kind.subdir());
        fs::create_dir_all(&dir)?;
        if !fs::symlink_metadata(&dir)?.is_dir() {
            return Err(io::Error::other(format!("{} is not a plain directory", dir.display())));
        }
        Ok(dir)
    }
}

impl Staged {
    /// A second handle on the staging file, for writing (for example through `tokio::fs::File::from_std`).
    pub fn file(&self) -> io::Result<File> {
        self.tmp.as_file().try_clone()
    }

    /// Makes the staged content the override: fsync, mode, rename over the target, fsync of the directory. Returns
    /// whether an earlier override was replaced. A directory that took the name since [`AssetStore::stage`] is
    /// [`WriteError::IsDirectory`] (checked, and the rename's own refusal is recognised too). Blocking.
    pub fn commit(self) -> Result<bool, WriteError> {
        let is_directory = WriteError::IsDirectory { subdir: self.kind.subdir(), name: self.name.clone() };
        self.tmp.as_file().sync_all()?;
        fs::set_permissions(self.tmp.path(), fs::Permissions::from_mode(self.mode))?;
        let replaced = match fs::symlink_metadata(&self.target) {
            Ok(meta) if meta.is_dir() => return Err(is_directory),
            Ok(_) => true,
            Err(_) => false,
        };
        match self.tmp.persist(&self.target) {
            Ok(_) => {}
            // rename(2) of a file over a directory: EISDIR (or ENOTEMPTY/EEXIST on some file systems).
            Err(_) if is_dir(&self.target).unwrap_or(false) => return Err(is_directory),
            Err(e) => return Err(e.error.into()),
        }
        sync_dir(&self.dir)?;
        Ok(replaced)
    }
}

/// Whether `path` is a directory itself (a symlink to one is not: renaming over a symlink replaces the link).
fn is_dir(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(meta.is_dir()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn store() -> (tempfile::TempDir, AssetStore) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("data")).unwrap();
        let store = AssetStore::new(&dir.path().join("data"), &dir.path().join("none")).unwrap();
        (dir, store)
    }

    fn staging_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(STAGING_PREFIX))
            .collect()
    }

    #[test]
    fn commit_replaces_atomically_and_drop_discards() {
        let (_tmp, store) = store();
        let install = store.data_dir().join("install");
        let staged = store.stage(AssetKind::Install, "install.sh").unwrap();
        staged.file().unwrap().write_all(b"one").unwrap();
        assert!(!staged.commit().unwrap(), "nothing was replaced");
        assert_eq!(fs::read(install.join("install.sh")).unwrap(), b"one");
        assert_eq!(fs::metadata(install.join("install.sh")).unwrap().permissions().mode() & 0o777, 0o755);

        let abandoned = store.stage(AssetKind::Install, "install.sh").unwrap();
        abandoned.file().unwrap().write_all(b"half").unwrap();
        assert_eq!(staging_files(&install).len(), 1);
        drop(abandoned);
        assert!(staging_files(&install).is_empty(), "an abandoned upload leaves no file");
        assert_eq!(fs::read(install.join("install.sh")).unwrap(), b"one");

        let staged = store.stage(AssetKind::Install, "install.sh").unwrap();
        staged.file().unwrap().write_all(b"two").unwrap();
        assert!(staged.commit().unwrap(), "the earlier override was replaced");
        assert_eq!(fs::read(install.join("install.sh")).unwrap(), b"two");
    }

    #[test]
    fn remove_and_modes() {
        let (_tmp, store) = store();
        assert!(!store.remove(AssetKind::Install, "x.ps1").unwrap());
        let staged = store.stage(AssetKind::Install, "x.ps1").unwrap();
        staged.file().unwrap().write_all(b"ps").unwrap();
        staged.commit().unwrap();
        let path = store.data_dir().join("install/x.ps1");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
        assert!(store.remove(AssetKind::Install, "x.ps1").unwrap());
        assert!(!path.exists());
        fs::create_dir(store.data_dir().join("install/adir")).unwrap();
        assert!(
            matches!(store.remove(AssetKind::Install, "adir"), Err(WriteError::IsDirectory { .. })),
            "a directory is never removed"
        );
    }

    #[test]
    fn a_directory_name_is_a_typed_conflict_on_stage_and_commit() {
        let (_tmp, store) = store();
        let install = store.data_dir().join("install");
        fs::create_dir_all(install.join("somedir")).unwrap();
        let err = store.stage(AssetKind::Install, "somedir").unwrap_err();
        assert!(matches!(&err, WriteError::IsDirectory { subdir: "install", name } if name == "somedir"), "{err:?}");
        assert_eq!(err.to_string(), "install/somedir is a directory in the data dir, not a file");
        // A directory that appears between stage and commit.
        let staged = store.stage(AssetKind::Install, "late").unwrap();
        staged.file().unwrap().write_all(b"x").unwrap();
        fs::create_dir(install.join("late")).unwrap();
        assert!(matches!(staged.commit(), Err(WriteError::IsDirectory { .. })));
        assert!(install.join("late").is_dir() && staging_files(&install).is_empty());
    }

    #[test]
    fn a_symlinked_override_dir_is_refused() {
        let (tmp, store) = store();
        fs::create_dir(tmp.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), store.data_dir().join("install")).unwrap();
        assert!(store.stage(AssetKind::Install, "install.sh").is_err());
    }

    #[test]
    fn stale_staging_files_are_removed_and_nothing_else() {
        let (tmp, store) = store();
        assert_eq!(store.remove_stale_staging().unwrap(), 0, "no override dirs yet");
        let install = store.data_dir().join("install");
        let staged = store.stage(AssetKind::Install, "install.sh").unwrap();
        std::mem::forget(staged); // as if the process died: the temporary file stays
        fs::write(install.join("keep.sh"), b"x").unwrap();
        fs::create_dir(install.join(".upload-dir")).unwrap();
        fs::write(tmp.path().join("outside"), b"x").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), install.join(".upload-link")).unwrap();
        assert_eq!(store.remove_stale_staging().unwrap(), 1);
        let mut left: Vec<_> = fs::read_dir(&install).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, [".upload-dir", ".upload-link", "keep.sh"]);
        assert!(tmp.path().join("outside").exists());
    }

    #[test]
    fn kinds_parse_from_their_segment() {
        assert_eq!("agent-binaries".parse::<AssetKind>().unwrap(), AssetKind::AgentBinary);
        assert_eq!("install".parse::<AssetKind>().unwrap(), AssetKind::Install);
        for bad in ["", "Install", "../install", "agent-binaries/", "secret.key"] {
            assert!(bad.parse::<AssetKind>().is_err(), "{bad:?}");
        }
    }
}
