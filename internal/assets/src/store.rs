//! The two asset roots and contained, race-aware file lookup.
//!
//! Lookup for `(kind, name)`: `<DataDir>/<subdir>/<name>`, then `<Bundled>/<subdir>/<name>`. A candidate is used only
//! if, after resolving every symlink, it is a regular file inside the same root's `<subdir>`, and that subdir is a
//! real directory of the root (so an install-dir symlink can never expose `<DataDir>/restic-manager.db`). The file is
//! opened once; everything a response says (length, dates, digest) comes from that open handle, and the body is read
//! from it too, so an operator renaming a new file into place mid-download cannot mix two versions.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use rm_buildinfo::{BuildInfo, Scanner};
use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

/// Which of the two trees an asset lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AssetKind {
    AgentBinary,
    Install,
    /// restic builds handed to agents (`/restic/binary`), with the same lookup, containment and digests.
    ResticBinary,
    /// The server's own archive of every agent build it has published, named by SHA-256 (`agent-builds/<hex>` in
    /// the data dir; `/agent/blobs/sha256/<hex>`), so a rollout can hand out a build that is no longer the served one.
    /// Not in [`AssetKind::ALL`]: operators neither upload nor remove archived builds through the asset API.
    AgentBuild,
}

impl AssetKind {
    /// The kinds an operator uploads and removes (the upload API's URL segments).
    pub const ALL: [AssetKind; 3] = [AssetKind::AgentBinary, AssetKind::Install, AssetKind::ResticBinary];

    /// The directory under each root, and the URL segment of the upload API.
    pub fn subdir(self) -> &'static str {
        match self {
            AssetKind::AgentBinary => "agent-binaries",
            AssetKind::Install => "install",
            AssetKind::ResticBinary => "restic-binaries",
            AssetKind::AgentBuild => "agent-builds",
        }
    }

    /// The file mode an uploaded file gets: executables (agents, restic, shell scripts) 0755, everything else 0644.
    pub fn mode_for(self, name: &str) -> u32 {
        let executable = match self {
            AssetKind::AgentBinary | AssetKind::AgentBuild => true,
            AssetKind::ResticBinary => !name.ends_with(".json"),
            AssetKind::Install => name.ends_with(".sh"),
        };
        if executable { 0o755 } else { 0o644 }
    }
}

/// A URL segment that names no asset kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("asset kind {0:?} (use agent-binaries, install or restic-binaries)")]
pub struct UnknownKind(pub String);

impl std::str::FromStr for AssetKind {
    type Err = UnknownKind;

    /// Parses the subdir name (`agent-binaries`, `install`, `restic-binaries`); anything else is an error naming the valid ones.
    fn from_str(segment: &str) -> Result<AssetKind, UnknownKind> {
        AssetKind::ALL
            .into_iter()
            .find(|k| k.subdir() == segment)
            .ok_or_else(|| UnknownKind(segment.chars().take(64).collect()))
    }
}

/// Which root served a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    DataDir,
    Bundled,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::DataDir => "data-dir",
            Source::Bundled => "bundled",
        }
    }
}

/// What identifies one version of one file: a rename, a rewrite or a `touch` changes it. This is the digest cache
/// key; ctime is part of it so that a rewrite in place that restores the old mtime is still hashed again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    fn of(meta: &Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// How the handle's `later` facts differ in content from `self`, taken when the handle was opened; `None` when
    /// the bytes read in between are one version.
    ///
    /// Only size and mtime count. The kernel moves mtime on every write and truncate of the inode, so a rewrite in
    /// place always shows there. ctime alone also moves on link-count and metadata changes that leave the content
    /// alone, above all the unlink of the replaced inode when a new version is renamed over its name (nlink drops,
    /// ctime is bumped): that is the supported way to replace a file, and the handle still reads the old version
    /// whole. (dev, ino) cannot differ for one open handle; they are compared for completeness.
    fn content_change(&self, later: &Identity) -> Option<&'static str> {
        if (self.dev, self.ino) != (later.dev, later.ino) {
            Some("a different file")
        } else if self.size != later.size {
            Some("its size changed")
        } else if self.mtime != later.mtime {
            Some("its modification time changed")
        } else {
            None
        }
    }
}

/// Content facts about one file version, computed once and cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub sha256: [u8; 32],
    /// The restic-manager build marker found in the file, if any (agent binaries carry one).
    pub build_info: Option<BuildInfo>,
}

impl Digest {
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// A resolved asset remembered after a full lookup: everything a response says about it, without an open file.
#[derive(Debug)]
pub struct Known {
    pub kind: AssetKind,
    pub name: String,
    pub source: Source,
    /// The request path inside its root (may be a symlink that stays inside).
    candidate: PathBuf,
    /// Where it resolved to when it was checked.
    real: PathBuf,
    identity: Identity,
    pub len: u64,
    pub modified: SystemTime,
    pub digest: Arc<Digest>,
    /// Whether change notification covers this file (it lies directly in a watched subdir, with no other links).
    watched: bool,
    /// For a watched file: the watch generation under which it was last found to be this version (the lookup's
    /// start, or a later `stat` that confirmed it, see [`AssetStore::still_current`]); [`NO_GENERATION`] while there
    /// is none: re-validate with `stat`.
    generation: AtomicU64,
}

/// [`Known::generation`] when no generation vouches for the file (the generation itself is never this).
const NO_GENERATION: u64 = u64::MAX;

impl Known {
    /// Opens the file for its body; `Ok(None)` if it is no longer this version (the caller then does a full lookup).
    pub fn open(&self) -> io::Result<Option<File>> {
        let file = match open_no_follow(&self.real) {
            Ok(f) => f,
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        Ok((meta.is_file() && Identity::of(&meta) == self.identity).then_some(file))
    }
}

/// An opened asset plus the facts taken from its handle.
#[derive(Debug)]
pub struct OpenAsset {
    pub file: File,
    pub len: u64,
    pub modified: SystemTime,
    pub source: Source,
    pub name: String,
    pub digest: Arc<Digest>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data dir {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    /// The open file's content changed (size or mtime of the same inode) during each of the hashing attempts: it is
    /// being written in place. Replacing a file by rename never causes this.
    #[error("{path} was modified in place while it was being hashed ({change}, on each of {attempts} attempts)")]
    Unstable { path: PathBuf, change: &'static str, attempts: usize },
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

const CACHE_CAPACITY: usize = 1024;
const HASH_CHUNK: usize = 256 * 1024;
const OPEN_ATTEMPTS: usize = 3;

type Slot = Arc<Mutex<Option<Arc<Digest>>>>;

pub struct AssetStore {
    data_dir: PathBuf,
    bundled_dir: Option<PathBuf>,
    cache: Mutex<HashMap<Identity, Slot>>,
    known: Mutex<HashMap<AssetKind, HashMap<String, Arc<Known>>>>,
    digests_computed: AtomicU64,
    /// Change notification for both roots' subdirs; `None` where unavailable (then every request `stat`s).
    watch: Option<Arc<crate::watch::Watch>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl AssetStore {
    /// Checks both roots. The data dir must be a readable directory; a missing or unusable bundled dir is logged and
    /// the store serves from the data dir alone.
    pub fn new(data_dir: &Path, bundled_dir: &Path) -> Result<AssetStore, StoreError> {
        AssetStore::open_roots(data_dir, bundled_dir, true)
    }

    /// Like [`AssetStore::new`], never using change notification: every request re-checks its file with `stat` (the
    /// fallback where inotify is unavailable; tests use it to keep that path honest).
    pub fn new_without_watch(data_dir: &Path, bundled_dir: &Path) -> Result<AssetStore, StoreError> {
        AssetStore::open_roots(data_dir, bundled_dir, false)
    }

    fn open_roots(data_dir: &Path, bundled_dir: &Path, watch: bool) -> Result<AssetStore, StoreError> {
        let fail = |reason: String| StoreError::DataDir { path: data_dir.to_path_buf(), reason };
        let data = fs::canonicalize(data_dir).map_err(|e| fail(describe(&e)))?;
        if !fs::metadata(&data).map_err(|e| fail(describe(&e)))?.is_dir() {
            return Err(fail("not a directory".into()));
        }
        fs::read_dir(&data).map_err(|e| fail(format!("cannot list it: {}", describe(&e))))?;

        let bundled = match fs::canonicalize(bundled_dir) {
            Ok(p) if p.is_dir() => Some(p),
            Ok(_) => {
                warn!(path = %bundled_dir.display(), "bundled assets dir is not a directory; serving the data dir only");
                None
            }
            Err(e) => {
                warn!(path = %bundled_dir.display(), error = %describe(&e), "bundled assets dir unavailable; serving the data dir only");
                None
            }
        };
        Ok(AssetStore::with_roots(data, bundled, watch))
    }

    fn with_roots(data: PathBuf, bundled: Option<PathBuf>, watch: bool) -> AssetStore {
        let subdirs = [AssetKind::AgentBinary, AssetKind::Install, AssetKind::ResticBinary, AssetKind::AgentBuild]
            .map(AssetKind::subdir);
        let roots: Vec<PathBuf> = std::iter::once(data.clone()).chain(bundled.clone()).collect();
        AssetStore {
            data_dir: data,
            bundled_dir: bundled,
            cache: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
            digests_computed: AtomicU64::new(0),
            watch: if watch && crate::watch::local(&roots) {
                crate::watch::Watch::start(&roots, &subdirs)
            } else {
                None
            },
        }
    }

    /// Whether remembered lookups are re-validated by change notification (else by `stat` on every request).
    pub fn watching(&self) -> bool {
        self.watch.is_some()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn bundled_dir(&self) -> Option<&Path> {
        self.bundled_dir.as_deref()
    }

    /// How many times a file's digest was computed (not served from cache) since start.
    pub fn digests_computed(&self) -> u64 {
        self.digests_computed.load(Ordering::Relaxed)
    }

    /// Whether the data dir is still there and listable (for readiness).
    pub fn check_data_dir(&self) -> io::Result<()> {
        fs::read_dir(&self.data_dir).map(drop)
    }

    /// Finds, opens and fingerprints `(kind, name)`. `name` must have passed [`crate::validate_name`] (or be a
    /// platform file name). `Ok(None)` means neither root has a usable file. Blocking: call from a blocking thread.
    pub fn open(&self, kind: AssetKind, name: &str) -> Result<Option<OpenAsset>, StoreError> {
        debug_assert!(crate::validate_name(name).is_ok(), "unvalidated name {name:?}");
        // Read before looking at any file: a change during the lookup then moves the generation past it.
        let generation = self.watch.as_ref().and_then(|w| w.current());
        let roots = [(Source::DataDir, Some(self.data_dir.as_path())), (Source::Bundled, self.bundled_dir.as_deref())];
        for (source, root) in roots {
            let Some(root) = root else { continue };
            if let Some(asset) = self.open_in(root, source, kind, name, generation)? {
                return Ok(Some(asset));
            }
        }
        Ok(None)
    }

    /// The names of `kind` that either root holds and a request could ask for (ones [`crate::validate_name`]
    /// accepts: never a staged upload), sorted and without repeats. Whether each is a usable file is for
    /// [`AssetStore::open`] to say. A missing subdir holds nothing. Blocking.
    pub fn names(&self, kind: AssetKind) -> io::Result<Vec<String>> {
        let mut names = std::collections::BTreeSet::new();
        for root in [Some(self.data_dir.as_path()), self.bundled_dir.as_deref()].into_iter().flatten() {
            let entries = match fs::read_dir(root.join(kind.subdir())) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let name = entry?.file_name();
                if let Some(name) = name.to_str().filter(|n| crate::validate_name(n).is_ok()) {
                    names.insert(name.to_owned());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    /// Like [`AssetStore::open`], in one root only (`Ok(None)` as well when that root is not configured).
    pub fn open_from(&self, source: Source, kind: AssetKind, name: &str) -> Result<Option<OpenAsset>, StoreError> {
        debug_assert!(crate::validate_name(name).is_ok(), "unvalidated name {name:?}");
        let root = match source {
            Source::DataDir => Some(self.data_dir.as_path()),
            Source::Bundled => self.bundled_dir.as_deref(),
        };
        // Not remembered as the answer for the name: a data-dir-only lookup says nothing about the fallback order.
        match root {
            Some(root) => self.open_in(root, source, kind, name, None),
            None => Ok(None),
        }
    }

    /// A previously resolved asset, if it is still what a full lookup would find. With change notification: nothing
    /// in the watched dirs changed since its lookup started (an atomic load and one `ioctl`). Otherwise: the data-dir
    /// copy is still absent (for a bundled hit) and `stat` of the request path, following symlinks, still gives the
    /// same file version. No open either way, so it is cheap enough to run on an async worker. `None` means "do the
    /// full lookup" ([`AssetStore::open`]), never "not found".
    pub fn known(&self, kind: AssetKind, name: &str) -> Option<Arc<Known>> {
        let known = lock(&self.known).get(&kind)?.get(name).cloned()?;
        self.still_current(&known).then_some(known)
    }

    /// Whether `known` (from [`AssetStore::known`]) is still what a full lookup would find: the same check `known`
    /// makes, for a caller that kept the `Known` (and something made from it) itself.
    ///
    /// A watched file that passes the `stat` check is stamped with the generation read before that check, so the next
    /// request is answered by the watch again: otherwise any change in the watched dirs (another file uploaded, a
    /// build archived) would leave every file remembered before it on `stat` until it changed itself. That is as
    /// sound as the lookup's own stamp: a change after the generation was read either shows in the `stat` (no stamp)
    /// or raises an event that moves the generation past the stamp.
    pub fn still_current(&self, known: &Known) -> bool {
        let stamp = match &self.watch {
            Some(watch) => {
                let generation = known.generation.load(Ordering::Acquire);
                if generation != NO_GENERATION && watch.unchanged_since(generation) {
                    return true;
                }
                watch.current().filter(|_| known.watched)
            }
            None => None,
        };
        if known.source == Source::Bundled {
            let override_path = self.data_dir.join(known.kind.subdir()).join(&known.name);
            match fs::symlink_metadata(&override_path) {
                Err(e) if is_absent(&e) => {}
                _ => return false,
            }
        }
        let same =
            fs::metadata(&known.candidate).is_ok_and(|meta| meta.is_file() && Identity::of(&meta) == known.identity);
        if same && let Some(generation) = stamp {
            known.generation.store(generation, Ordering::Release);
        }
        same
    }

    fn remember(&self, known: Known) {
        let mut map = lock(&self.known);
        let names = map.entry(known.kind).or_default();
        if names.len() >= CACHE_CAPACITY {
            names.clear();
        }
        names.insert(known.name.clone(), Arc::new(known));
    }

    fn open_in(
        &self,
        root: &Path,
        source: Source,
        kind: AssetKind,
        name: &str,
        generation: Option<u64>,
    ) -> Result<Option<OpenAsset>, StoreError> {
        let dir = root.join(kind.subdir());
        let candidate = dir.join(name);
        let io_err = |source: io::Error| StoreError::Io { path: candidate.clone(), source };
        let mut last_change = "";
        for _ in 0..OPEN_ATTEMPTS {
            let Some((file, meta, real)) = open_contained(root, &dir, &candidate).map_err(io_err)? else {
                return Ok(None);
            };
            let identity = Identity::of(&meta);
            let digest = match self.digest(&file, identity) {
                Ok(d) => d,
                Err(DigestError::Changed(change)) => {
                    debug!(path = %candidate.display(), change, "file modified in place while hashing; reopening");
                    last_change = change;
                    continue;
                }
                Err(DigestError::Io(e)) => return Err(io_err(e)),
            };
            let modified = meta.modified().map_err(io_err)?;
            // The subdir's watch sees changes to the entries directly in it (a symlink's target included when it is
            // one of them); a file deeper down is re-checked with `stat`.
            // A file with other hard links could be written through a name outside the watched dir: `stat` it.
            let watched = real.parent() == Some(dir.as_path()) && meta.nlink() == 1;
            let known = Known {
                kind,
                name: name.to_string(),
                source,
                candidate: candidate.clone(),
                real,
                identity,
                len: identity.size,
                modified,
                digest: digest.clone(),
                watched,
                generation: AtomicU64::new(generation.filter(|_| watched).unwrap_or(NO_GENERATION)),
            };
            self.remember(known);
            return Ok(Some(OpenAsset { file, len: identity.size, modified, source, name: name.to_string(), digest }));
        }
        Err(StoreError::Unstable { path: candidate, change: last_change, attempts: OPEN_ATTEMPTS })
    }

    fn digest(&self, file: &File, identity: Identity) -> Result<Arc<Digest>, DigestError> {
        let slot = {
            let mut cache = lock(&self.cache);
            if cache.len() >= CACHE_CAPACITY && !cache.contains_key(&identity) {
                cache.clear();
            }
            cache.entry(identity).or_default().clone()
        };
        // Concurrent first requests for one file version wait here instead of hashing it again.
        let mut slot = lock(&slot);
        if let Some(digest) = slot.as_ref() {
            return Ok(digest.clone());
        }
        let digest = Arc::new(compute_digest(file, identity.size)?);
        self.digests_computed.fetch_add(1, Ordering::Relaxed);
        if let Some(change) = identity.content_change(&Identity::of(&file.metadata()?)) {
            return Err(DigestError::Changed(change));
        }
        *slot = Some(digest.clone());
        Ok(digest)
    }
}

enum DigestError {
    /// The content of the open file changed while it was hashed (what changed).
    Changed(&'static str),
    Io(io::Error),
}

impl From<io::Error> for DigestError {
    fn from(e: io::Error) -> Self {
        DigestError::Io(e)
    }
}

fn compute_digest(file: &File, len: u64) -> Result<Digest, DigestError> {
    let mut hasher = Sha256::new();
    let mut scanner = Scanner::default();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut offset = 0u64;
    while offset < len {
        let want = usize::try_from(len - offset).unwrap_or(usize::MAX).min(buf.len());
        let n = file.read_at(&mut buf[..want], offset)?;
        if n == 0 {
            return Err(DigestError::Changed("it shrank while being read"));
        }
        hasher.update(&buf[..n]);
        scanner.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(Digest { sha256: hasher.finalize().into(), build_info: scanner.finish() })
}

/// Opens `candidate` if it resolves to a regular file inside `root/<subdir>`; `Ok(None)` for absent, refused or
/// non-regular entries (refusals are logged: they are operator mistakes or attacks worth seeing).
fn open_contained(root: &Path, dir: &Path, candidate: &Path) -> io::Result<Option<(File, Metadata, PathBuf)>> {
    if let Err(e) = fs::symlink_metadata(candidate) {
        return absent_or(e);
    }
    let real_dir = match fs::canonicalize(dir) {
        Ok(p) => p,
        Err(e) => return absent_or(e),
    };
    if real_dir != dir {
        warn!(dir = %dir.display(), resolved = %real_dir.display(), "asset dir is a symlink; refusing to serve from it");
        return Ok(None);
    }
    let real = match fs::canonicalize(candidate) {
        Ok(p) => p,
        Err(e) if is_absent(&e) => {
            warn!(path = %candidate.display(), "dangling symlink; not served");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if !real.starts_with(&real_dir) {
        warn!(path = %candidate.display(), resolved = %real.display(), root = %root.display(),
            "symlink leads outside its asset dir; refused");
        return Ok(None);
    }
    let file = match open_no_follow(&real) {
        Ok(f) => f,
        Err(e) => return absent_or(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        warn!(path = %candidate.display(), "not a regular file; not served");
        return Ok(None);
    }
    Ok(Some((file, meta, real)))
}

/// O_NOFOLLOW: a symlink swapped in after the checks is refused; O_NONBLOCK: a FIFO cannot hang the open.
fn open_no_follow(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY).open(path)
}

fn is_absent(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) || e.raw_os_error() == Some(libc::ELOOP)
}

fn absent_or<T>(e: io::Error) -> io::Result<Option<T>> {
    if is_absent(&e) { Ok(None) } else { Err(e) }
}

fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "does not exist".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::symlink;
    use std::time::Duration;

    struct Roots {
        _tmp: tempfile::TempDir,
        data: PathBuf,
        bundled: PathBuf,
        outside: PathBuf,
    }

    fn roots() -> Roots {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let bundled = tmp.path().join("bundled");
        let outside = tmp.path().join("outside");
        for d in [&data, &bundled, &outside] {
            fs::create_dir_all(d.join("agent-binaries")).unwrap();
            fs::create_dir_all(d.join("install")).unwrap();
        }
        fs::write(outside.join("secret"), b"top secret").unwrap();
        Roots { _tmp: tmp, data, bundled, outside }
    }

    fn read(asset: &OpenAsset) -> Vec<u8> {
        let mut buf = vec![0; asset.len as usize];
        asset.file.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn data_dir_shadows_bundled_and_falls_back() {
        let r = roots();
        fs::write(r.bundled.join("install/install.sh"), b"bundled").unwrap();
        let store = AssetStore::new(&r.data, &r.bundled).unwrap();
        let a = store.open(AssetKind::Install, "install.sh").unwrap().unwrap();
        assert_eq!((a.source, read(&a)), (Source::Bundled, b"bundled".to_vec()));
        fs::write(r.data.join("install/install.sh"), b"override").unwrap();
        let a = store.open(AssetKind::Install, "install.sh").unwrap().unwrap();
        assert_eq!((a.source, read(&a)), (Source::DataDir, b"override".to_vec()));
        assert!(store.open(AssetKind::Install, "other.sh").unwrap().is_none());
    }

    #[test]
    fn names_are_the_union_of_both_roots_without_hidden_or_staged_files() {
        let r = roots();
        fs::write(r.bundled.join("install/install.sh"), b"bundled").unwrap();
        fs::write(r.bundled.join("install/install.ps1"), b"bundled").unwrap();
        fs::write(r.data.join("install/install.sh"), b"override").unwrap();
        fs::write(r.data.join("install/.upload-abc"), b"staged").unwrap();
        fs::write(r.data.join("install/bad name"), b"x").unwrap();
        let store = AssetStore::new(&r.data, &r.bundled).unwrap();
        assert_eq!(store.names(AssetKind::Install).unwrap(), ["install.ps1", "install.sh"]);
        assert!(store.names(AssetKind::ResticBinary).unwrap().is_empty(), "no such subdir");
    }

    #[test]
    fn symlinks_out_of_either_root_are_refused() {
        let r = roots();
        let store = AssetStore::new(&r.data, &r.bundled).unwrap();
        symlink(r.outside.join("secret"), r.data.join("install/a")).unwrap();
        symlink(r.outside.join("secret"), r.bundled.join("install/b")).unwrap();
        symlink("../../outside/secret", r.bundled.join("install/c")).unwrap();
        // Inside the data dir but outside its install subdir: the database must never be reachable.
        fs::write(r.data.join("restic-manager.db"), b"db").unwrap();
        symlink("../restic-manager.db", r.data.join("install/d")).unwrap();
        for name in ["a", "b", "c", "d"] {
            assert!(store.open(AssetKind::Install, name).unwrap().is_none(), "{name} served");
        }
        // A symlink that stays inside its subdir is fine.
        fs::write(r.data.join("install/real.sh"), b"real").unwrap();
        symlink("real.sh", r.data.join("install/alias.sh")).unwrap();
        assert_eq!(read(&store.open(AssetKind::Install, "alias.sh").unwrap().unwrap()), b"real");
    }

    #[test]
    fn a_symlinked_subdir_is_refused() {
        let r = roots();
        fs::remove_dir_all(r.data.join("install")).unwrap();
        symlink(r.outside.join("install"), r.data.join("install")).unwrap();
        fs::write(r.outside.join("install/x.sh"), b"outside").unwrap();
        let store = AssetStore::new(&r.data, &r.bundled).unwrap();
        assert!(store.open(AssetKind::Install, "x.sh").unwrap().is_none());
    }

    #[test]
    fn non_regular_files_are_not_served() {
        let r = roots();
        fs::create_dir(r.data.join("install/dir")).unwrap();
        let fifo = std::ffi::CString::new(r.data.join("install/fifo").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let store = AssetStore::new(&r.data, &r.bundled).unwrap();
        assert!(store.open(AssetKind::Install, "dir").unwrap().is_none());
        assert!(store.open(AssetKind::Install, "fifo").unwrap().is_none());
    }

    #[test]
    fn digest_is_cached_per_file_version() {
        let r = roots();
        let path = r.data.join("agent-binaries/restic-manager-agent-linux-amd64");
        fs::write(&path, b"v1").unwrap();
        let store = AssetStore::new(&r.data, &r.bundled).unwrap();
        let name = "restic-manager-agent-linux-amd64";
        let first = store.open(AssetKind::AgentBinary, name).unwrap().unwrap().digest;
        for _ in 0..5 {
            store.open(AssetKind::AgentBinary, name).unwrap().unwrap();
        }
        assert_eq!(store.digests_computed(), 1);
        assert_eq!(first.sha256_hex(), hex::encode(Sha256::digest(b"v1")));
        // Replace by rename: a new version, hashed once more.
        let tmp = r.data.join("agent-binaries/.tmp");
        fs::File::create(&tmp).unwrap().write_all(b"version two").unwrap();
        fs::rename(&tmp, &path).unwrap();
        let second = store.open(AssetKind::AgentBinary, name).unwrap().unwrap().digest;
        assert_eq!(second.sha256_hex(), hex::encode(Sha256::digest(b"version two")));
        assert_eq!(store.digests_computed(), 2);
    }

    /// Opens `path` and returns the handle and its identity, after waiting long enough that any later change of
    /// the inode gets a different timestamp (the kernel's file clock is coarse).
    fn opened_then_tick(path: &Path) -> (File, Identity) {
        let file = File::open(path).unwrap();
        let identity = Identity::of(&file.metadata().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(30));
        (file, identity)
    }

    #[test]
    fn a_hash_pass_overlapping_an_unlink_or_a_rename_over_is_not_a_rewrite() {
        let r = roots();
        let store = AssetStore::new(&r.data, &r.bundled).unwrap();
        let path = r.data.join("agent-binaries/restic-manager-agent-linux-amd64");
        let old = vec![7u8; 3 * HASH_CHUNK + 5];
        let want = hex::encode(Sha256::digest(&old));

        // Unlinked while the handle is held (as the hash pass runs): nlink 0, ctime bumped, content untouched.
        fs::write(&path, &old).unwrap();
        let (file, identity) = opened_then_tick(&path);
        fs::remove_file(&path).unwrap();
        let after = file.metadata().unwrap();
        assert_eq!(after.nlink(), 0);
        assert_ne!(Identity::of(&after), identity, "the unlink must bump ctime, or this test proves nothing");
        let digest = store.digest(&file, identity).unwrap_or_else(|_| panic!("an unlink was taken for a rewrite"));
        assert_eq!(digest.sha256_hex(), want);

        // A new version renamed over the name: the open handle still hashes the old version, whole.
        fs::write(&path, &old).unwrap();
        let (file, identity) = opened_then_tick(&path);
        let tmp = r.data.join("agent-binaries/.tmp");
        fs::write(&tmp, b"new version").unwrap();
        fs::rename(&tmp, &path).unwrap();
        assert_ne!(Identity::of(&file.metadata().unwrap()), identity);
        let digest = store.digest(&file, identity).unwrap_or_else(|_| panic!("a rename-over was taken for a rewrite"));
        assert_eq!(digest.sha256_hex(), want);
        assert_eq!(
            read(&store.open(AssetKind::AgentBinary, "restic-manager-agent-linux-amd64").unwrap().unwrap()),
            b"new version"
        );

        // Real rewrites of the same inode still count: a same-size overwrite (mtime) and an append (size).
        fs::write(&path, &old).unwrap();
        let (file, identity) = opened_then_tick(&path);
        fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&[8u8; 16], 100).unwrap();
        assert!(matches!(store.digest(&file, identity), Err(DigestError::Changed(_))), "a rewrite in place was missed");
        let (file, identity) = opened_then_tick(&path);
        fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"more").unwrap();
        assert!(matches!(store.digest(&file, identity), Err(DigestError::Changed(_))), "an append was missed");
    }

    #[test]
    fn build_marker_is_read_from_the_file() {
        let r = roots();
        let mut body = vec![1u8; 300_000];
        body.extend_from_slice(b"\0rm-buildinfo:v1;version=2.0.0;commit=cafe;date=2026-02-02T00:00:00Z;\0");
        fs::write(r.bundled.join("agent-binaries/restic-manager-agent-linux-arm64"), &body).unwrap();
        let store = AssetStore::new(&r.data, &r.bundled).unwrap();
        let a = store.open(AssetKind::AgentBinary, "restic-manager-agent-linux-arm64").unwrap().unwrap();
        assert_eq!(a.digest.build_info.as_ref().map(|b| b.commit.as_str()), Some("cafe"));
    }

    #[test]
    fn missing_data_dir_is_an_error_and_missing_bundled_is_not() {
        let r = roots();
        let err = AssetStore::new(&r.data.join("nope"), &r.bundled).err().unwrap();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let store = AssetStore::new(&r.data, &r.bundled.join("nope")).unwrap();
        assert!(store.bundled_dir().is_none());
    }

    /// Both ways of re-validating a remembered lookup: change notification, and `stat` (the fallback).
    fn stores(r: &Roots) -> [(AssetStore, &'static str); 2] {
        let watched = AssetStore::new(&r.data, &r.bundled).unwrap();
        assert!(watched.watching(), "inotify is available here: the watched store must use it");
        let stat = AssetStore::new_without_watch(&r.data, &r.bundled).unwrap();
        assert!(!stat.watching());
        [(watched, "watch"), (stat, "stat")]
    }

    fn remembered(store: &AssetStore, name: &str) -> Option<Vec<u8>> {
        let known = store.known(AssetKind::Install, name)?;
        let file = known.open().unwrap()?;
        let mut buf = vec![0; known.len as usize];
        file.read_exact_at(&mut buf, 0).unwrap();
        Some(buf)
    }

    /// Every replacement is seen by the very next lookup, a thousand times over: the remembered version is never
    /// served once the rename has returned.
    #[test]
    fn a_remembered_lookup_never_outlives_a_replacement() {
        let r = roots();
        for (store, mode) in stores(&r) {
            let path = r.data.join("install/s.sh");
            fs::write(&path, b"version 0").unwrap();
            store.open(AssetKind::Install, "s.sh").unwrap().unwrap();
            assert_eq!(remembered(&store, "s.sh").as_deref(), Some(&b"version 0"[..]), "{mode}: unchanged is trusted");
            for i in 1..=1000 {
                let staged = r.data.join("install/.staged");
                fs::write(&staged, format!("version {i}")).unwrap();
                fs::rename(&staged, &path).unwrap();
                match remembered(&store, "s.sh") {
                    None => {}
                    Some(bytes) => assert_eq!(bytes, format!("version {i}").into_bytes(), "{mode}: stale after {i}"),
                }
                let fresh = store.open(AssetKind::Install, "s.sh").unwrap().unwrap();
                assert_eq!(read(&fresh), format!("version {i}").into_bytes());
            }
        }
    }

    /// A file the watch stopped vouching for (another file in its dir changed) is confirmed once with `stat`, then
    /// vouched for by the watch again; a replacement right after that is still seen at once, a thousand times over.
    #[test]
    fn a_file_confirmed_by_stat_is_vouched_for_by_the_watch_again() {
        let r = roots();
        let (store, _) = stores(&r).into_iter().next().unwrap();
        let watch = store.watch.clone().expect("a watched store");
        let path = r.data.join("install/s.sh");
        fs::write(&path, b"version 0").unwrap();
        store.open(AssetKind::Install, "s.sh").unwrap().unwrap();
        for i in 1..=1000 {
            let known = store.known(AssetKind::Install, "s.sh").expect("an unchanged file is trusted");
            let stamp = known.generation.load(Ordering::Acquire);
            fs::write(r.data.join("install/other.sh"), format!("{i}")).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let settled = loop {
                match watch.current() {
                    Some(g) if g != stamp && watch.unchanged_since(g) => break g,
                    _ if std::time::Instant::now() > deadline => panic!("the watch did not move past {stamp}"),
                    _ => std::thread::sleep(Duration::from_millis(1)),
                }
            };
            assert!(store.still_current(&known), "{i}: the file itself did not change");
            assert_eq!(known.generation.load(Ordering::Acquire), settled, "{i}: stamped with the generation");
            assert!(store.still_current(&known), "{i}: and vouched for by the watch");
            let staged = r.data.join("install/.staged");
            fs::write(&staged, format!("version {i}")).unwrap();
            fs::rename(&staged, &path).unwrap();
            assert!(!store.still_current(&known), "{i}: a replacement is seen at once");
            assert!(store.known(AssetKind::Install, "s.sh").is_none(), "{i}");
            let fresh = store.open(AssetKind::Install, "s.sh").unwrap().unwrap();
            assert_eq!(read(&fresh), format!("version {i}").into_bytes());
        }
    }

    #[test]
    fn a_rewrite_in_place_and_a_chmod_are_seen() {
        let r = roots();
        for (store, mode) in stores(&r) {
            let path = r.data.join("install/p.sh");
            fs::write(&path, b"aaaa").unwrap();
            store.open(AssetKind::Install, "p.sh").unwrap().unwrap();
            assert!(store.known(AssetKind::Install, "p.sh").is_some(), "{mode}");
            fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(b"bbbb", 0).unwrap();
            assert!(store.known(AssetKind::Install, "p.sh").is_none(), "{mode}: same size rewritten in place");
            store.open(AssetKind::Install, "p.sh").unwrap().unwrap();
            assert!(store.known(AssetKind::Install, "p.sh").is_some(), "{mode}");
            fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            assert!(store.known(AssetKind::Install, "p.sh").is_none(), "{mode}: a chmod changes ctime");
        }
    }

    /// An override dropped into a data-dir subdir that did not exist yet shadows the remembered bundled file at once.
    #[test]
    fn an_override_in_a_new_data_subdir_shadows_the_bundled_file_at_once() {
        let r = roots();
        fs::create_dir_all(r.bundled.join("restic-binaries")).unwrap();
        fs::write(r.bundled.join("restic-binaries/restic-linux-amd64"), b"bundled").unwrap();
        for (store, mode) in stores(&r) {
            let _ = fs::remove_dir_all(r.data.join("restic-binaries"));
            let name = "restic-linux-amd64";
            let hit = store.open(AssetKind::ResticBinary, name).unwrap().unwrap();
            assert_eq!(hit.source, Source::Bundled);
            assert!(store.known(AssetKind::ResticBinary, name).is_some(), "{mode}");
            fs::create_dir(r.data.join("restic-binaries")).unwrap();
            fs::write(r.data.join("restic-binaries").join(name), b"override").unwrap();
            assert!(store.known(AssetKind::ResticBinary, name).is_none(), "{mode}: the override must win at once");
            assert_eq!(store.open(AssetKind::ResticBinary, name).unwrap().unwrap().source, Source::DataDir);
            // A file created right after the subdir, before the watch on it could be added, is seen too.
            fs::remove_dir_all(r.data.join("restic-binaries")).unwrap();
            store.open(AssetKind::ResticBinary, name).unwrap().unwrap();
            fs::create_dir(r.data.join("restic-binaries")).unwrap();
            fs::write(r.data.join("restic-binaries").join(name), b"override").unwrap();
            assert!(store.known(AssetKind::ResticBinary, name).is_none(), "{mode}");
        }
    }

    /// Files the subdir's watch cannot see change through (a symlink into a deeper dir, a file with another hard
    /// link) are re-checked with `stat` even when the store watches.
    #[test]
    fn files_beyond_the_watch_are_rechecked_with_stat() {
        let r = roots();
        let (store, _) = stores(&r).into_iter().next().unwrap();
        fs::create_dir_all(r.data.join("install/deeper")).unwrap();
        fs::write(r.data.join("install/deeper/real.sh"), b"one").unwrap();
        symlink("deeper/real.sh", r.data.join("install/link.sh")).unwrap();
        store.open(AssetKind::Install, "link.sh").unwrap().unwrap();
        assert!(store.known(AssetKind::Install, "link.sh").is_some());
        fs::write(r.data.join("install/deeper/real.sh"), b"two!").unwrap();
        assert!(store.known(AssetKind::Install, "link.sh").is_none(), "a change in a deeper dir is seen");

        fs::write(r.data.join("install/linked.sh"), b"one").unwrap();
        fs::hard_link(r.data.join("install/linked.sh"), r.outside.join("other-name")).unwrap();
        store.open(AssetKind::Install, "linked.sh").unwrap().unwrap();
        assert!(store.known(AssetKind::Install, "linked.sh").is_some());
        fs::write(r.outside.join("other-name"), b"two!").unwrap();
        assert!(store.known(AssetKind::Install, "linked.sh").is_none(), "a write through another link is seen");
    }
}
