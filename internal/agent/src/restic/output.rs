//! restic's output, read without trusting it: `restic version`, the `--json` lines of `backup` (on stdout and on
//! stderr), `snapshots --json`, and what an exit code plus restic's words mean. Nothing here panics or fails on
//! malformed input: a line that is not what we expect is kept as text for the message, or ignored.

use std::collections::VecDeque;

use rm_protocol::backup::{BackupSummary, Progress, Snapshot};
use serde_json::Value;

use super::Version;

/// The version in `restic version`'s output: `restic 0.14.0 compiled with go1.19.8 on linux/amd64`,
/// `restic 0.17.3-dev (compiled manually) compiled with …`, `restic v0.16.0 …`. A two-part version (`0.14`) reads as
/// patch 0; anything after the numbers (`-dev`, `+ds`, `-rc1`) is ignored.
pub(crate) fn parse_version(text: &str) -> Option<Version> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("restic ")?;
        let token = rest.split_whitespace().next()?;
        let token = token.strip_prefix('v').unwrap_or(token);
        let end = token.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(token.len());
        let mut parts = token[..end].split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = match parts.next() {
            None | Some("") => 0,
            Some(p) => p.parse().ok()?,
        };
        Some(Version { major, minor, patch })
    })
}

/// One line restic printed, on stdout or stderr.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Line {
    /// `{"message_type":"status",…}`
    Status(Progress),
    /// `{"message_type":"summary",…}`
    Summary(BackupSummary),
    /// `{"message_type":"error",…}`: a file restic could not read (a warning unless restic also fails), in words.
    Error(String),
    /// `{"message_type":"exit_error",…}` (restic 0.17+) or a text line starting `Fatal:`: why restic gave up.
    Fatal(String),
    /// JSON we have no use for (`verbose_status`, …).
    Ignored,
    /// `\t/path/file.go:123` (or `.s:`): a line of a Go stack trace (restic 0.14 prints one with some errors); together with
    /// the function name above it, left out of messages.
    Trace,
    /// Anything else: restic's words (0.14 prints its warnings and fatal errors as text, even with `--json`).
    Text(String),
}

pub(crate) fn parse_line(line: &str) -> Line {
    if line.starts_with('\t') && (line.contains(".go:") || line.contains(".s:")) {
        return Line::Trace;
    }
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Line::Ignored;
    }
    if trimmed.starts_with('{') {
        if let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(trimmed) {
            let value = Value::Object(obj);
            return match value.get("message_type").and_then(Value::as_str) {
                Some("status") => Line::Status(progress(&value)),
                Some("summary") => Line::Summary(summary(&value)),
                Some("error") => Line::Error(error_text(&value)),
                Some("exit_error") => Line::Fatal(format!("Fatal: {}", str_of(&value, "message"))),
                _ => Line::Ignored,
            };
        }
    }
    if trimmed.starts_with("Fatal:") { Line::Fatal(trimmed.to_string()) } else { Line::Text(trimmed.to_string()) }
}

fn u64_of(v: &Value, key: &str) -> u64 {
    opt_u64(v, key).unwrap_or(0)
}

fn opt_u64(v: &Value, key: &str) -> Option<u64> {
    let x = v.get(key)?;
    x.as_u64().or_else(|| x.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f as u64))
}

fn i64_of(v: &Value, key: &str) -> i64 {
    v.get(key).and_then(|x| x.as_i64().or_else(|| x.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))).unwrap_or(0)
}

fn f64_of(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).filter(|f| f.is_finite()).unwrap_or(0.0)
}

fn str_of(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

fn strings_of(v: &Value, key: &str) -> Vec<String> {
    match v.get(key) {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

fn progress(v: &Value) -> Progress {
    Progress {
        percent_done: f64_of(v, "percent_done").clamp(0.0, 1.0),
        total_files: u64_of(v, "total_files"),
        files_done: u64_of(v, "files_done"),
        total_bytes: u64_of(v, "total_bytes"),
        bytes_done: u64_of(v, "bytes_done"),
        seconds_elapsed: u64_of(v, "seconds_elapsed"),
        seconds_remaining: opt_u64(v, "seconds_remaining"),
    }
}

fn summary(v: &Value) -> BackupSummary {
    BackupSummary {
        files_new: u64_of(v, "files_new"),
        files_changed: u64_of(v, "files_changed"),
        files_unmodified: u64_of(v, "files_unmodified"),
        dirs_new: u64_of(v, "dirs_new"),
        dirs_changed: u64_of(v, "dirs_changed"),
        dirs_unmodified: u64_of(v, "dirs_unmodified"),
        data_blobs: i64_of(v, "data_blobs"),
        tree_blobs: i64_of(v, "tree_blobs"),
        data_added: u64_of(v, "data_added"),
        total_files_processed: u64_of(v, "total_files_processed"),
        total_bytes_processed: u64_of(v, "total_bytes_processed"),
        total_duration: f64_of(v, "total_duration"),
        snapshot_id: v.get("snapshot_id").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string),
    }
}

/// A per-file error in words. restic 0.14 prints Go's `*fs.PathError` as it marshals
/// (`{"error":{"Op":"open","Path":"/x","Err":13},"during":"archival","item":"/x"}`); newer versions print
/// `{"error":{"message":"open /x: permission denied"},…}`.
fn error_text(v: &Value) -> String {
    let item = str_of(v, "item");
    let error = match v.get("error") {
        Some(Value::String(s)) => s.clone(),
        Some(e @ Value::Object(_)) if e.get("message").and_then(Value::as_str).is_some() => str_of(e, "message"),
        Some(e @ Value::Object(_)) if e.get("Op").is_some() || e.get("Path").is_some() => {
            let cause = match e.get("Err") {
                Some(Value::Number(n)) => match n.as_i64().and_then(|n| i32::try_from(n).ok()) {
                    Some(code) => errno_text(code),
                    None => n.to_string(),
                },
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => "error".to_string(),
            };
            format!("{} {}: {cause}", str_of(e, "Op"), str_of(e, "Path")).trim_start().to_string()
        }
        Some(other) => other.to_string(),
        None => String::new(),
    };
    match (item.is_empty(), error.is_empty()) {
        (_, true) if item.is_empty() => "restic reported an error".to_string(),
        (false, true) => format!("{item}: error"),
        (false, false) if !error.contains(&item) => format!("{item}: {error}"),
        _ => error,
    }
}

/// An errno as words (restic runs on this host, so the host's numbering applies): `permission denied`.
fn errno_text(code: i32) -> String {
    let text = std::io::Error::from_raw_os_error(code).to_string();
    // "Permission denied (os error 13)" → "permission denied", as Go prints it.
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => format!("errno {code}"),
    }
}

/// `snapshots --json`: an array of snapshot objects. Missing fields are left empty (`short_id` is derived from
/// `id`); entries that are not objects, or have no id, are skipped. `None` if the text is not a JSON array.
pub(crate) fn parse_snapshots(text: &str) -> Option<Vec<Snapshot>> {
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(text.trim()) else {
        return None;
    };
    Some(snapshot_list(&items))
}

fn snapshot_list(items: &[Value]) -> Vec<Snapshot> {
    items.iter().filter_map(snapshot_of).collect()
}

fn snapshot_of(v: &Value) -> Option<Snapshot> {
    if !v.is_object() {
        return None;
    }
    let id = str_of(v, "id");
    if id.is_empty() {
        return None;
    }
    let mut short_id = str_of(v, "short_id");
    if short_id.is_empty() {
        short_id = id.chars().take(8).collect();
    }
    Some(Snapshot {
        short_id,
        time: str_of(v, "time"),
        hostname: str_of(v, "hostname"),
        paths: strings_of(v, "paths"),
        tags: strings_of(v, "tags"),
        id,
    })
}

/// What `forget --json` said it kept and removed, over all its groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Forgotten {
    pub kept: Vec<Snapshot>,
    pub removed: Vec<Snapshot>,
    /// How many groups restic formed (the agent's filters and `--group-by host` make it 0 or 1).
    pub groups: usize,
}

/// `forget --json` (restic 0.14 and later): one JSON array of groups, each `{"tags","host","paths","keep":[…],
/// "remove":[…]|null,"reasons":[…]}`, the snapshots as `snapshots --json` prints them. restic prints nothing at all
/// when no snapshot matched the filters: that is zero groups. `None` if the output is neither.
pub(crate) fn parse_forget(text: &str) -> Option<Forgotten> {
    let text = text.trim();
    if text.is_empty() {
        return Some(Forgotten::default());
    }
    let Ok(Value::Array(groups)) = serde_json::from_str::<Value>(text) else {
        return None;
    };
    let mut out = Forgotten::default();
    for group in groups.iter().filter(|g| g.is_object()) {
        out.groups += 1;
        for (key, list) in [("keep", &mut out.kept), ("remove", &mut out.removed)] {
            if let Some(Value::Array(items)) = group.get(key) {
                list.extend(snapshot_list(items));
            }
        }
    }
    Some(out)
}

/// How restic ended, read from its exit code and, for restic before 0.17 (which exits 1 for every failure), from
/// its words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    Success,
    /// Exit 3: a snapshot was made, some files could not be read.
    Warning,
    /// Exit 130: restic was interrupted (by us, or by a Ctrl-C reaching the agent's process group).
    Interrupted,
    RepositoryMissing,
    WrongPassword,
    Locked,
    Other,
}

/// Words of a storage backend saying the thing asked for is not there (local, sftp, rest, s3, azure, gs, b2).
const NOT_THERE: &[&str] =
    &["no such file or directory", "does not exist", "doesn't exist", "nosuchkey", "nosuchbucket", "not_found", "404"];

pub(crate) fn classify(code: Option<i32>, words: &str) -> Ending {
    match code {
        Some(0) => return Ending::Success,
        Some(3) => return Ending::Warning,
        Some(130) => return Ending::Interrupted,
        Some(10) => return Ending::RepositoryMissing,
        Some(11) => return Ending::Locked,
        Some(12) => return Ending::WrongPassword,
        _ => {}
    }
    let lower = words.to_lowercase();
    if lower.contains("wrong password or no key found") {
        Ending::WrongPassword
    } else if lower.contains("repository is already locked") {
        Ending::Locked
    } else if lower.contains("repository does not exist")
        // restic < 0.17 adds this hint to every failure to read the config file, a refused connection included:
        // only a "not there" answer from the storage means the repository is missing.
        || (lower.contains("is there a repository at the following location?")
            && NOT_THERE.iter().any(|w| lower.contains(w)))
    {
        Ending::RepositoryMissing
    } else {
        Ending::Other
    }
}

/// The end of what restic said, bounded: the last [`Tail::MAX_LINES`] lines within [`Tail::MAX_BYTES`], each line
/// cut at [`Tail::MAX_LINE`] characters, made printable (ANSI sequences removed, control characters escaped). The
/// first few `Fatal:` lines are kept apart so the reason restic gave up is never scrolled away.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    fatal: Vec<String>,
    lines: VecDeque<String>,
    bytes: usize,
    dropped: usize,
}

impl Tail {
    pub const MAX_LINES: usize = 40;
    pub const MAX_BYTES: usize = 8 * 1024;
    pub const MAX_LINE: usize = 1024;
    const MAX_FATAL: usize = 4;

    pub fn push(&mut self, line: &str) {
        let line = clean(line);
        if line.is_empty() || self.lines.back() == Some(&line) {
            return;
        }
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > Self::MAX_LINES || (self.bytes > Self::MAX_BYTES && self.lines.len() > 1) {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.len();
                self.dropped += 1;
            }
        }
    }

    pub fn push_fatal(&mut self, line: &str) {
        let line = clean(line);
        if line.is_empty() || self.fatal.contains(&line) {
            return;
        }
        if self.fatal.len() < Self::MAX_FATAL {
            self.fatal.push(line);
        } else {
            self.push(&line);
        }
    }

    pub fn push_line(&mut self, line: &Line) {
        match line {
            Line::Fatal(text) => self.push_fatal(text),
            Line::Error(text) | Line::Text(text) => self.push(text),
            // The function name of this stack frame was the line before.
            Line::Trace => {
                if self.lines.back().is_some_and(|l| !l.contains(char::is_whitespace)) {
                    if let Some(old) = self.lines.pop_back() {
                        self.bytes -= old.len();
                    }
                }
            }
            Line::Status(_) | Line::Summary(_) | Line::Ignored => {}
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fatal.is_empty() && self.lines.is_empty()
    }

    /// Everything kept, for classification (not bounded for display).
    pub fn words(&self) -> String {
        self.fatal.iter().chain(self.lines.iter()).cloned().collect::<Vec<_>>().join("\n")
    }

    /// The message for an operator: the `Fatal:` lines first, then the tail in order.
    pub fn message(&self) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        let mut out: Vec<String> = self.fatal.clone();
        if self.dropped > 0 {
            out.push(format!("(… {} earlier lines left out)", self.dropped));
        }
        out.extend(self.lines.iter().cloned());
        Some(out.join("\n"))
    }
}

/// One line made safe to show: ANSI escape sequences (restic 0.14 prints `ESC[2K` before some messages) removed,
/// other control characters escaped, cut at [`Tail::MAX_LINE`] characters.
fn clean(line: &str) -> String {
    let mut stripped = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // parameters and intermediates, up to the final byte (0x40..=0x7E)
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
            continue;
        }
        stripped.push(c);
    }
    let printable = crate::printable(stripped.trim());
    if printable.chars().count() > Tail::MAX_LINE {
        let mut cut: String = printable.chars().take(Tail::MAX_LINE).collect();
        cut.push('…');
        cut
    } else {
        printable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_of_releases_dev_builds_and_distributions() {
        let v = |major, minor, patch| Some(Version { major, minor, patch });
        assert_eq!(parse_version("restic 0.14.0 compiled with go1.19.8 on linux/amd64\n"), v(0, 14, 0));
        assert_eq!(
            parse_version("restic 0.17.3-dev (compiled manually) compiled with go1.23.1 on linux/amd64"),
            v(0, 17, 3)
        );
        assert_eq!(parse_version("restic v0.16.4 compiled with go1.21 on windows/amd64"), v(0, 16, 4));
        assert_eq!(parse_version("restic 0.9 compiled with go1.10"), v(0, 9, 0));
        assert_eq!(parse_version("restic 0.12.1+ds compiled with go1.15"), v(0, 12, 1));
        assert_eq!(parse_version("warning: something\nrestic 1.0.0 compiled"), v(1, 0, 0));
        assert_eq!(parse_version("rustic 0.14.0"), None);
        assert_eq!(parse_version("restic unknown"), None);
        assert_eq!(parse_version("restic 14"), None);
        assert_eq!(parse_version(""), None);
        assert!(v(0, 13, 9) < v(0, 14, 0) && v(0, 14, 0) < v(0, 14, 1) && v(0, 14, 9) < v(1, 0, 0));
    }

    #[test]
    fn status_and_summary_lines_of_restic_0_14() {
        let status = r#"{"message_type":"status","percent_done":0.175,"total_files":40,"files_done":5,"total_bytes":40000000,"bytes_done":7000000,"current_files":["/big/f14"]}"#;
        assert_eq!(
            parse_line(status),
            Line::Status(Progress {
                percent_done: 0.175,
                total_files: 40,
                files_done: 5,
                total_bytes: 40_000_000,
                bytes_done: 7_000_000,
                seconds_elapsed: 0,
                seconds_remaining: None
            })
        );
        let summary = r#"{"message_type":"summary","files_new":5,"files_changed":1,"files_unmodified":2,"dirs_new":1,"dirs_changed":0,"dirs_unmodified":0,"data_blobs":5,"tree_blobs":2,"data_added":52085,"total_files_processed":8,"total_bytes_processed":50000,"total_duration":0.214404302,"snapshot_id":"11e185dc","new_field":[1]}"#;
        let Line::Summary(s) = parse_line(summary) else { panic!("not a summary") };
        assert_eq!((s.files_new, s.files_changed, s.files_unmodified, s.data_added), (5, 1, 2, 52085));
        assert_eq!(s.snapshot_id.as_deref(), Some("11e185dc"));
        assert!((s.total_duration - 0.2144).abs() < 0.001);
    }

    #[test]
    fn malformed_and_odd_lines_never_fail() {
        assert_eq!(parse_line(""), Line::Ignored);
        assert_eq!(parse_line(r#"{"message_type":"verbose_status","action":"new"}"#), Line::Ignored);
        assert_eq!(parse_line("{not json"), Line::Text("{not json".into()));
        assert_eq!(parse_line("[1,2]"), Line::Text("[1,2]".into()));
        let Line::Status(p) = parse_line(
            r#"{"message_type":"status","percent_done":"x","total_files":-3,"bytes_done":1e3,"seconds_remaining":-1}"#,
        ) else {
            panic!("still a status")
        };
        assert_eq!((p.percent_done, p.total_files, p.bytes_done, p.seconds_remaining), (0.0, 0, 1000, None));
        let Line::Summary(s) = parse_line(r#"{"message_type":"summary","snapshot_id":null,"data_blobs":-1}"#) else {
            panic!("still a summary")
        };
        assert_eq!((s.snapshot_id, s.data_blobs), (None, -1));
        assert_eq!(
            parse_line("Fatal: wrong password or no key found"),
            Line::Fatal("Fatal: wrong password or no key found".into())
        );
    }

    #[test]
    fn file_errors_old_and_new() {
        let old = r#"{"message_type":"error","error":{"Op":"open","Path":"/srv/secret","Err":13},"during":"archival","item":"/srv/secret"}"#;
        let Line::Error(text) = parse_line(old) else { panic!("error line") };
        #[cfg(unix)]
        assert_eq!(text, "open /srv/secret: permission denied");
        assert!(text.starts_with("open /srv/secret: "), "{text}");
        let new = r#"{"message_type":"error","error":{"message":"lstat /srv/gone: no such file or directory"},"during":"scan","item":"/srv/gone"}"#;
        assert_eq!(parse_line(new), Line::Error("lstat /srv/gone: no such file or directory".into()));
        let other = r#"{"message_type":"error","error":{"weird":true},"item":"/x"}"#;
        assert_eq!(parse_line(other), Line::Error(r#"/x: {"weird":true}"#.into()));
        assert_eq!(parse_line(r#"{"message_type":"error"}"#), Line::Error("restic reported an error".into()));
        let exit = r#"{"message_type":"exit_error","code":10,"message":"repository does not exist: unable to open config file"}"#;
        assert_eq!(
            parse_line(exit),
            Line::Fatal("Fatal: repository does not exist: unable to open config file".into())
        );
    }

    #[test]
    fn snapshots_are_read_tolerantly() {
        let text = r#"[{"time":"2026-12-02T10:01:39.35Z","tree":"8f65","paths":["/tmp/src"],"hostname":"h1","username":"root","tags":["rm-plan:p1","x"],"id":"90a410e6424403ef79f5bebb434a4d4a2ef9997756a558611bb8d83cb7cf79ff","short_id":"90a410e6"},
            {"id":"abcdef0123456789","paths":null},{"no_id":1},3]"#;
        let snaps = parse_snapshots(text).unwrap();
        assert_eq!(snaps.len(), 2);
        assert_eq!(snaps[0].short_id, "90a410e6");
        assert_eq!(snaps[0].tags, ["rm-plan:p1", "x"]);
        assert_eq!(snaps[0].hostname, "h1");
        assert_eq!(snaps[1].short_id, "abcdef01");
        assert!(snaps[1].paths.is_empty() && snaps[1].tags.is_empty());
        assert_eq!(parse_snapshots("[]\n"), Some(vec![]));
        assert_eq!(parse_snapshots("null"), None);
        assert_eq!(parse_snapshots("Fatal: x"), None);
    }

    #[test]
    fn forget_output_of_restic_0_14() {
        // Recorded from restic 0.14.0: `forget --json --host h1 --tag rm-plan:p --group-by host --keep-last 1`.
        let recorded = r#"[{"tags":null,"host":"h1","paths":null,"keep":[{"time":"2026-12-02T13:17:31.192268404Z","parent":"e8297211c8243291f9c855221d70d2ba2e8675ebaa3acbb75dd080214ccb8c1a","tree":"d10db45aa3d7438d3af8c8c2f76b0cd01e9f156e55a6616bda5f20fed257bc2f","paths":["/tmp/rtest/d"],"hostname":"h1","username":"root","tags":["rm-plan:p"],"id":"8682c54730d1c0d65081f0a162fce0cac859223af21bac31b4acaba5c7d3af7e","short_id":"8682c547"}],"remove":[{"time":"2026-12-02T13:17:30.493471632Z","tree":"d10db45aa3d7438d3af8c8c2f76b0cd01e9f156e55a6616bda5f20fed257bc2f","paths":["/tmp/rtest/d"],"hostname":"h1","username":"root","tags":["rm-plan:p"],"id":"e8297211c8243291f9c855221d70d2ba2e8675ebaa3acbb75dd080214ccb8c1a","short_id":"e8297211"}],"reasons":[{"snapshot":{"time":"2026-12-02T13:17:31.192268404Z","paths":["/tmp/rtest/d"],"hostname":"h1","tags":["rm-plan:p"]},"matches":["last snapshot"],"counters":{"last":1}}]}]"#;
        let f = parse_forget(&format!("{recorded}\n")).unwrap();
        assert_eq!((f.groups, f.kept.len(), f.removed.len()), (1, 1, 1));
        assert_eq!(f.kept[0].id, "8682c54730d1c0d65081f0a162fce0cac859223af21bac31b4acaba5c7d3af7e");
        assert_eq!(f.kept[0].hostname, "h1");
        assert_eq!(f.kept[0].tags, ["rm-plan:p"]);
        assert_eq!(f.removed[0].short_id, "e8297211");
        // Nothing removed: restic writes null.
        let none =
            parse_forget(r#"[{"host":"h1","keep":[{"id":"ab","time":"t"}],"remove":null,"reasons":[]}]"#).unwrap();
        assert_eq!((none.kept.len(), none.removed.len()), (1, 0));
        // No snapshot matched: restic prints nothing.
        assert_eq!(parse_forget(""), Some(Forgotten::default()));
        assert_eq!(parse_forget("[]").unwrap().groups, 0);
        // Not forget's JSON: refused rather than read as "nothing removed".
        assert_eq!(parse_forget("Applying Policy: keep 3 latest snapshots"), None);
        assert_eq!(parse_forget(r#"{"keep":[]}"#), None);
        let odd = parse_forget(r#"[1, {"keep":"x","remove":[{"no":"id"},{"id":"cd"}]}]"#).unwrap();
        assert_eq!((odd.groups, odd.kept.len(), odd.removed.len()), (1, 0, 1));
    }

    #[test]
    fn exit_codes_and_restic_0_14_words() {
        assert_eq!(classify(Some(0), "x does not exist, skipping"), Ending::Success);
        assert_eq!(classify(Some(3), ""), Ending::Warning);
        assert_eq!(classify(Some(130), ""), Ending::Interrupted);
        assert_eq!(classify(Some(10), ""), Ending::RepositoryMissing);
        assert_eq!(classify(Some(11), ""), Ending::Locked);
        assert_eq!(classify(Some(12), ""), Ending::WrongPassword);
        assert_eq!(classify(Some(1), "Fatal: wrong password or no key found"), Ending::WrongPassword);
        let missing = "Fatal: unable to open config file: stat /r/config: no such file or directory\n\
                       Is there a repository at the following location?\n/r";
        assert_eq!(classify(Some(1), missing), Ending::RepositoryMissing);
        let s3_missing = "Fatal: unable to open config file: Stat: The specified key does not exist.\n\
                          Is there a repository at the following location?\ns3:http://h/b";
        assert_eq!(classify(Some(1), s3_missing), Ending::RepositoryMissing);
        let refused = "Fatal: unable to open config file: Stat: Get \"http://127.0.0.1:1/b/?location=\": dial tcp \
                       127.0.0.1:1: connect: connection refused\nIs there a repository at the following location?\n\
                       s3:http://127.0.0.1:1/b";
        assert_eq!(classify(Some(1), refused), Ending::Other);
        let locked = "unable to create lock in backend: repository is already locked exclusively by PID 1 on vm";
        assert_eq!(classify(Some(1), locked), Ending::Locked);
        assert_eq!(classify(Some(1), "Fatal: all target directories/files do not exist"), Ending::Other);
        assert_eq!(classify(None, ""), Ending::Other);
    }

    #[test]
    fn the_tail_is_bounded_printable_and_puts_fatal_first() {
        let mut tail = Tail::default();
        assert_eq!(tail.message(), None);
        tail.push("\u{1b}[2Ksignal interrupt received, cleaning up");
        tail.push("a\rforged");
        assert_eq!(tail.message().unwrap(), "signal interrupt received, cleaning up\na\\u{d}forged");
        for i in 0..100 {
            tail.push(&format!("line {i}"));
        }
        tail.push_fatal("Fatal: it broke");
        let message = tail.message().unwrap();
        assert!(message.starts_with("Fatal: it broke\n(… 62 earlier lines left out)\nline 60\n"), "{message}");
        assert!(message.ends_with("line 99"));
        let mut tail = Tail::default();
        for _ in 0..50 {
            tail.push(&"x".repeat(5000));
            tail.push("y");
        }
        let message = tail.message().unwrap();
        assert!(message.len() <= Tail::MAX_BYTES + 2 * Tail::MAX_LINE, "{}", message.len());
        assert!(message.contains('…'));
    }

    #[test]
    fn go_stack_traces_are_left_out() {
        let printed = "cannot parse root certificate from \"/x/ca.pem\"\n\
                       github.com/restic/restic/internal/backend.Transport\n\
                       \tgithub.com/restic/restic/internal/backend/http_transport.go:113\n\
                       main.open\n\
                       \tgithub.com/restic/restic/cmd/restic/global.go:703\n\
                       github.com/spf13/cobra.(*Command).execute\n\
                       \tgithub.com/spf13/cobra/command.go:916\n\
                       runtime.goexit\n\
                       \truntime/asm_amd64.s:1594\n\
                       s3:http://127.0.0.1:1/b";
        let mut tail = Tail::default();
        for line in printed.lines() {
            tail.push_line(&parse_line(line));
        }
        assert_eq!(
            tail.message().unwrap(),
            "cannot parse root certificate from \"/x/ca.pem\"\ns3:http://127.0.0.1:1/b"
        );
    }
}
