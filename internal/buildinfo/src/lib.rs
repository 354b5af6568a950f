//! Build information embedded into every restic-manager binary.
//!
//! The three values live in one contiguous marker string inside the binary:
//! `\0rm-buildinfo:v1;version=…;commit=…;date=…;\0`. A running binary reads its own copy ([`current`]); the server reads
//! the marker out of an agent file it serves ([`scan`]), so it can report which agent build a file holds without
//! executing it (it may be built for another platform).

use serde::{Deserialize, Serialize};

/// The marker as compiled into this binary. `static` (not `const`) so the bytes exist once, verbatim, in the file.
static MARKER: &str = concat!(
    "\0rm-buildinfo:v1;version=",
    env!("RM_BUILD_VERSION"),
    ";commit=",
    env!("RM_BUILD_COMMIT"),
    ";date=",
    env!("RM_BUILD_DATE"),
    ";\0"
);

const PREFIX: &[u8] = b"\0rm-buildinfo:v1;";
/// Longest marker accepted when scanning a file: each value is at most 128 bytes (enforced by build.rs).
pub const MAX_MARKER_LEN: usize = 512;

/// Version, commit and build date of one binary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    pub version: String,
    pub commit: String,
    pub date: String,
}

impl BuildInfo {
    /// The one-line form printed by `--version` (after the program name).
    pub fn version_line(&self) -> String {
        format!("version={} commit={} date={}", self.version, self.commit, self.date)
    }
}

/// This binary's own build information.
pub fn current() -> BuildInfo {
    // black_box keeps the compiler from splitting the marker into separate constants.
    parse_marker(std::hint::black_box(MARKER).as_bytes()).expect("the embedded marker is well-formed")
}

/// The `--version` text for a program: `NAME version=… commit=… date=…`.
pub fn version_text(program: &str) -> String {
    format!("{program} {}", current().version_line())
}

/// Parses a marker that starts at the beginning of `bytes`.
fn parse_marker(bytes: &[u8]) -> Option<BuildInfo> {
    let rest = bytes.strip_prefix(PREFIX)?;
    let end = memchr::memchr(0, rest)?;
    let body = std::str::from_utf8(&rest[..end]).ok()?;
    let mut fields = body.strip_suffix(';')?.split(';');
    let mut take = |key: &str| -> Option<String> {
        let value = fields.next()?.strip_prefix(key)?.strip_prefix('=')?;
        (!value.is_empty()).then(|| value.to_string())
    };
    let info = BuildInfo { version: take("version")?, commit: take("commit")?, date: take("date")? };
    fields.next().is_none().then_some(info)
}

/// Incremental search for an embedded marker in a file read in chunks, in order.
///
/// Feed every chunk to [`Scanner::update`]; [`Scanner::finish`] returns the first well-formed marker. Markers that
/// straddle chunk boundaries are found: the scanner keeps the tail of the previous chunk.
#[derive(Default)]
pub struct Scanner {
    carry: Vec<u8>,
    found: Option<BuildInfo>,
}

impl Scanner {
    pub fn update(&mut self, chunk: &[u8]) {
        if self.found.is_some() {
            return;
        }
        self.carry.extend_from_slice(chunk);
        let finder = memchr::memmem::Finder::new(PREFIX);
        let mut consumed = 0;
        for pos in finder.find_iter(&self.carry) {
            let candidate = &self.carry[pos..];
            if memchr::memchr(0, &candidate[1..]).is_none() && candidate.len() < MAX_MARKER_LEN {
                // The marker may continue in the next chunk: keep it.
                consumed = pos;
                break;
            }
            if let Some(info) = parse_marker(&candidate[..candidate.len().min(MAX_MARKER_LEN)]) {
                self.found = Some(info);
                self.carry = Vec::new();
                return;
            }
            consumed = pos + 1;
        }
        // Keep just enough of the tail to complete a marker that starts near the end.
        let keep_from = consumed.max(self.carry.len().saturating_sub(MAX_MARKER_LEN));
        self.carry.drain(..keep_from);
    }

    pub fn finish(self) -> Option<BuildInfo> {
        self.found
    }
}

/// Finds the build information embedded in a whole file's bytes.
pub fn scan(bytes: &[u8]) -> Option<BuildInfo> {
    let mut scanner = Scanner::default();
    scanner.update(bytes);
    scanner.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_reads_its_own_marker() {
        let info = current();
        assert_eq!(info.version, env!("RM_BUILD_VERSION"));
        assert_eq!(info.commit, env!("RM_BUILD_COMMIT"));
        assert_eq!(info.date, env!("RM_BUILD_DATE"));
    }

    fn sample() -> Vec<u8> {
        let mut file = vec![0x7fu8; 10_000];
        file.extend_from_slice(b"\0rm-buildinfo:v1;version=1.2.3;commit=abc;date=2026-01-01T00:00:00Z;\0");
        file.extend_from_slice(&[0u8; 5_000]);
        file
    }

    #[test]
    fn scan_finds_marker_in_any_chunking() {
        let file = sample();
        let want = BuildInfo { version: "1.2.3".into(), commit: "abc".into(), date: "2026-01-01T00:00:00Z".into() };
        assert_eq!(scan(&file), Some(want.clone()));
        for chunk in [1, 7, 16, 63, 64, 100, 4096] {
            let mut s = Scanner::default();
            file.chunks(chunk).for_each(|c| s.update(c));
            assert_eq!(s.finish(), Some(want.clone()), "chunk size {chunk}");
        }
    }

    #[test]
    fn scan_skips_decoys_and_malformed_markers() {
        let mut file = b"xx\0rm-buildinfo:v1;version=1;commit=2;\0yy".to_vec(); // missing date
        file.extend_from_slice(b"\0rm-buildinfo:v1;version=;commit=2;date=3;\0"); // empty version
        assert_eq!(scan(&file), None);
        file.extend_from_slice(b"\0rm-buildinfo:v1;version=9;commit=8;date=7;\0");
        assert_eq!(scan(&file).map(|i| i.version), Some("9".into()));
        assert_eq!(scan(b"no marker here"), None);
    }
}
