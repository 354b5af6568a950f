//! Table tests of the release helpers, run by every POSIX shell available (`dash`, `sh`, `busybox sh`):
//! `scripts/release-tags.sh` (the version and image tags of a tag push or a manual dispatch) and
//! `scripts/image-pin.sh` (the digest pin in `deploy/image-pin.env`: check, get, set), plus `shellcheck` on both.
//! No server, no docker: the scripts only compute and edit text.
//!
//! Hostile inputs (`$(touch …)`, backticks, newlines) name a file in the case's temp dir; each test asserts that the
//! file was never created, that stdout stayed empty and that messages echo nothing that could form an extra line.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rm_e2e::run_bounded;

/// Bound for one run of a script (normally a few milliseconds).
const TIMEOUT: Duration = Duration::from_secs(20);

/// The shells the scripts must work under, when installed: (name for messages, program and leading arguments).
const CANDIDATE_SHELLS: [(&str, &[&str]); 3] =
    [("dash", &["dash"]), ("sh", &["sh"]), ("busybox sh", &["busybox", "sh"])];

const TAGS_SCRIPT: &str = "scripts/release-tags.sh";
const PIN_SCRIPT: &str = "scripts/image-pin.sh";

/// A valid digest and its variants.
const HEX: &str = "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945";
const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The file a hostile input tries to create (relative to the case's temp dir, which is also the working dir).
const PWNED: &str = "pwned";

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").join(rel)
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool} >/dev/null 2>&1")]).status().is_ok_and(|s| s.success())
}

/// The candidate shells that are installed (`sh` always is); notes the ones skipped.
fn shells() -> Vec<(&'static str, &'static [&'static str])> {
    let found: Vec<_> = CANDIDATE_SHELLS
        .into_iter()
        .filter(|(name, shell)| {
            let ok = have(shell[0]);
            if !ok {
                eprintln!("NOTE: {name} is not installed; skipping it");
            }
            ok
        })
        .collect();
    assert!(!found.is_empty(), "no POSIX shell found");
    found
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("rm-e2e-release-").tempdir().expect("tempdir")
}

/// `<shell> <repo script> <args>` in `cwd`, bounded, with an environment that cannot change what the script does.
fn run_in(shell: &[&str], script: &str, args: &[String], cwd: &Path) -> Output {
    let mut cmd = Command::new(shell[0]);
    cmd.args(&shell[1..]).arg(repo_file(script)).args(args).current_dir(cwd).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("RM_") || k.starts_with("GITHUB_") || k.starts_with("LC_") || k == "LANG" {
            cmd.env_remove(&key);
        }
    }
    run_bounded(cmd, TIMEOUT)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(out: &Output) -> String {
    format!("exit {:?}\n--- stdout\n{}--- stderr\n{}", out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).permissions().mode() & 0o7777
}

/// Docker's tag grammar: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn docker_tag(tag: &str) -> bool {
    let ok = |c: char, first: bool| c.is_ascii_alphanumeric() || c == '_' || (!first && (c == '.' || c == '-'));
    (1..=128).contains(&tag.len()) && tag.chars().enumerate().all(|(i, c)| ok(c, i == 0))
}

/// Fails with every collected problem at once.
fn assert_no_failures(failures: Vec<String>, what: &str) {
    assert!(failures.is_empty(), "{} {what} failed:\n\n{}", failures.len(), failures.join("\n\n"));
}

// ---------------------------------------------------------------------------------------------------------------
// release-tags.sh
// ---------------------------------------------------------------------------------------------------------------

enum TagWant {
    /// Exit 0, exactly these two lines on stdout, nothing on stderr.
    Ok { version: &'static str, tags: &'static str },
    /// Exit `code`, empty stdout, a message containing `says` on stderr.
    Fail { code: i32, says: &'static str },
}

struct TagCase {
    /// `{DIR}` is replaced by the case's temp dir.
    args: &'static [&'static str],
    want: TagWant,
}

const fn ok(args: &'static [&'static str], version: &'static str, tags: &'static str) -> TagCase {
    TagCase { args, want: TagWant::Ok { version, tags } }
}

const fn fail(args: &'static [&'static str], code: i32, says: &'static str) -> TagCase {
    TagCase { args, want: TagWant::Fail { code, says } }
}

const SHA40: &str = "0123456789abcdef0123456789abcdef01234567";

const TAG_CASES: &[TagCase] = &[
    // Releases: vX.Y.Z fans out to X.Y and X, plus latest from 1.0.0 on.
    ok(&["v0.0.0"], "0.0.0", "v0.0.0 0.0 0"),
    ok(&["v0.3.1"], "0.3.1", "v0.3.1 0.3 0"),
    ok(&["v0.9.9"], "0.9.9", "v0.9.9 0.9 0"),
    ok(&["v1.0.0"], "1.0.0", "v1.0.0 1.0 1 latest"),
    ok(&["v1.2.3"], "1.2.3", "v1.2.3 1.2 1 latest"),
    ok(&["v2.10.3"], "2.10.3", "v2.10.3 2.10 2 latest"),
    ok(&["v10.0.0"], "10.0.0", "v10.0.0 10.0 10 latest"),
    ok(&["v1.20.300"], "1.20.300", "v1.20.300 1.20 1 latest"),
    ok(&["refs/tags/v1.2.3"], "1.2.3", "v1.2.3 1.2 1 latest"),
    ok(&["refs/tags/v0.1.0"], "0.1.0", "v0.1.0 0.1 0"),
    // Pre-releases: the one tag only.
    ok(&["v1.0.0-alpha"], "1.0.0-alpha", "v1.0.0-alpha"),
    ok(&["v1.0.0-alpha.1"], "1.0.0-alpha.1", "v1.0.0-alpha.1"),
    ok(&["v1.0.0-0.3.7"], "1.0.0-0.3.7", "v1.0.0-0.3.7"),
    ok(&["v1.0.0-x.7.z.92"], "1.0.0-x.7.z.92", "v1.0.0-x.7.z.92"),
    ok(&["v1.2.3-rc.1"], "1.2.3-rc.1", "v1.2.3-rc.1"),
    ok(&["v1.2.3-0a.rc-1.--"], "1.2.3-0a.rc-1.--", "v1.2.3-0a.rc-1.--"),
    ok(&["refs/tags/v2.0.0-rc.1"], "2.0.0-rc.1", "v2.0.0-rc.1"),
    ok(&["v0.1.0-0"], "0.1.0-0", "v0.1.0-0"),
    // Manual dispatch: snapshot-<first 7 hex digits, lowercase>.
    ok(&["--dispatch", SHA40], "0.0.0-snapshot-0123456", "snapshot-0123456"),
    ok(&["--dispatch", "abcdef0"], "0.0.0-snapshot-abcdef0", "snapshot-abcdef0"),
    ok(&["--dispatch", "ABCDEF0123456789ABCDEF0123456789ABCDEF01"], "0.0.0-snapshot-abcdef0", "snapshot-abcdef0"),
    ok(&["--dispatch", "DeadBeef1234"], "0.0.0-snapshot-deadbee", "snapshot-deadbee"),
    // Not a release tag.
    fail(&["refs/heads/main"], 1, "is a branch"),
    fail(&["refs/heads/v1.2.3"], 1, "is a branch"),
    fail(&["refs/pull/7/merge"], 1, "not a tag ref"),
    fail(&["refs/tags/main"], 1, "not a release tag"),
    fail(&["refs/tags/1.2.3"], 1, "lacks the leading v"),
    fail(&["refs/tags/release-1.2.3"], 1, "not a release tag"),
    fail(&["refs/tags/"], 1, "empty tag"),
    fail(&["refs/tags/v1.2"], 1, "three version numbers"),
    fail(&["1.2.3"], 1, "lacks the leading v"),
    fail(&["V1.2.3"], 1, "not a release tag"),
    fail(&["v"], 1, "three version numbers"),
    fail(&["v1.2"], 1, "three version numbers"),
    fail(&["v1"], 1, "three version numbers"),
    fail(&["v01.2.3"], 1, "without leading zeros"),
    fail(&["v1.02.3"], 1, "without leading zeros"),
    fail(&["v1.2.03"], 1, "without leading zeros"),
    fail(&["v1.2.3.4"], 1, "more than three"),
    fail(&["v1..3"], 1, "without leading zeros"),
    fail(&["v1.2.x"], 1, "without leading zeros"),
    fail(&[""], 1, "empty ref"),
    // SemVer pre-release rules.
    fail(&["v1.2.3-01"], 1, "leading zero"),
    fail(&["v1.2.3-rc.01"], 1, "leading zero"),
    fail(&["v1.2.3-"], 1, "empty pre-release"),
    fail(&["v1.2.3-rc..1"], 1, "empty pre-release identifier"),
    fail(&["v1.2.3-rc."], 1, "empty pre-release identifier"),
    fail(&["v1.2.3-rc_1"], 1, "characters a release tag cannot have"),
    // Build metadata cannot be part of a Docker tag.
    fail(&["v1.2.3+build"], 1, "build metadata"),
    fail(&["v1.2.3-rc.1+build.5"], 1, "build metadata"),
    fail(&["refs/tags/v1.2.3+20260101"], 1, "build metadata"),
    // Longer than a Docker tag.
    fail(
        &[
            "v1.0.0-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ],
        1,
        "longer than a Docker tag",
    ),
    // Hostile text: never evaluated, never echoed raw, nothing on stdout.
    fail(&["v1.2.3\nlatest=1"], 1, "characters a release tag cannot have"),
    fail(&["v1.2.3\n"], 1, "characters a release tag cannot have"),
    fail(&["refs/tags/v1.2.3\ntags=evil"], 1, "characters a release tag cannot have"),
    fail(&["$(touch {DIR}/pwned)"], 1, "characters a release tag cannot have"),
    fail(&["v1.2.3$(touch {DIR}/pwned)"], 1, "characters a release tag cannot have"),
    fail(&["`touch {DIR}/pwned`"], 1, "characters a release tag cannot have"),
    fail(&["v1.2.3;touch {DIR}/pwned"], 1, "characters a release tag cannot have"),
    fail(&["v1.2.3 && touch {DIR}/pwned"], 1, "characters a release tag cannot have"),
    fail(&["v1.2.3 "], 1, "characters a release tag cannot have"),
    fail(&[" v1.2.3"], 1, "characters a release tag cannot have"),
    fail(&["--dispatch", "$(touch {DIR}/pwned)"], 1, "7 to 40 hex digits"),
    fail(&["--dispatch", "abcdef0\nlatest=1"], 1, "7 to 40 hex digits"),
    // Dispatch SHAs.
    fail(&["--dispatch", "abc123"], 1, "7 to 40 hex digits"),
    fail(&["--dispatch", "0123456789abcdef0123456789abcdef012345678"], 1, "7 to 40 hex digits"),
    fail(&["--dispatch", "g123456"], 1, "7 to 40 hex digits"),
    fail(&["--dispatch", ""], 1, "7 to 40 hex digits"),
    // Usage.
    fail(&[], 2, "usage:"),
    fail(&["v1.2.3", "v1.2.4"], 2, "usage:"),
    fail(&["--dispatch"], 2, "usage:"),
    fail(&["--dispatch", SHA40, "extra"], 2, "usage:"),
    fail(&["--bogus"], 2, "unknown option"),
    fail(&["refs/tags/v1.2.3", "--dispatch"], 2, "usage:"),
];

/// Checks one run against its case; returns the problems found.
fn check_tag_case(shell_name: &str, case: &TagCase, args: &[String], dir: &Path, out: &Output) -> Vec<String> {
    let mut problems = Vec::new();
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    match case.want {
        TagWant::Ok { version, tags } => {
            let want = format!("version={version}\ntags={tags}\n");
            if out.status.code() != Some(0) || stdout != want || !stderr.is_empty() {
                problems.push(format!("wanted exit 0 and stdout\n{want}"));
            }
            problems.extend(tags.split(' ').filter(|t| !docker_tag(t)).map(|t| format!("{t:?} is not a Docker tag")));
        }
        TagWant::Fail { code, says } => {
            if out.status.code() != Some(code) {
                problems.push(format!("wanted exit {code}"));
            }
            if !out.stdout.is_empty() {
                problems.push("stdout must stay empty on errors".into());
            }
            if !stderr.contains(says) {
                problems.push(format!("stderr should contain {says:?}"));
            }
            // Every message line is the script's own: hostile text cannot start a line or smuggle shell syntax.
            if stderr.lines().any(|l| !l.starts_with("release-tags: ") && !l.starts_with("usage: ")) {
                problems.push("a stderr line that is not the script's own".into());
            }
            if stderr.contains('`') || stderr.contains("$(") || stderr.contains('\r') {
                problems.push("stderr echoes hostile text raw".into());
            }
        }
    }
    if dir.join(PWNED).exists() {
        problems.push(format!("{PWNED} was created: the input was evaluated"));
    }
    if problems.is_empty() {
        Vec::new()
    } else {
        vec![format!("{shell_name} release-tags.sh {args:?}: {}\n{}", problems.join("; "), describe(out))]
    }
}

#[test]
fn release_tags_table() {
    assert!(TAG_CASES.len() >= 25, "the table should cover at least 25 cases");
    let mut failures = Vec::new();
    let mut runs = 0;
    for (shell_name, shell) in shells() {
        for case in TAG_CASES {
            let dir = tempdir();
            let args: Vec<String> =
                case.args.iter().map(|a| a.replace("{DIR}", dir.path().to_str().expect("UTF-8 temp path"))).collect();
            let out = run_in(shell, TAGS_SCRIPT, &args, dir.path());
            failures.extend(check_tag_case(shell_name, case, &args, dir.path(), &out));
            runs += 1;
        }
    }
    eprintln!("release-tags.sh: {} cases, {runs} runs", TAG_CASES.len());
    assert_no_failures(failures, "release-tags cases");
}

/// What a CI job does with the output: `>>"$GITHUB_OUTPUT"`. Two runs add exactly their lines; a refused ref adds
/// nothing at all.
#[test]
fn release_tags_output_appends_to_github_output() {
    let script = repo_file(TAGS_SCRIPT);
    for (shell_name, shell) in shells() {
        let dir = tempdir();
        let gh_output = dir.path().join("github_output");
        fs::write(&gh_output, "earlier=1\n").unwrap();
        for (arg, code) in [
            ("refs/tags/v1.4.2", 0),
            ("v1.2.3\nlatest=1", 1),
            ("$(touch pwned)", 1),
            ("v1.4.2+build", 1),
            ("v1.4.3-rc.2", 0),
        ] {
            let mut cmd = Command::new(shell[0]);
            cmd.args(&shell[1..]).arg(&script).arg(arg).current_dir(dir.path()).stdin(Stdio::null());
            cmd.stdout(fs::OpenOptions::new().append(true).open(&gh_output).unwrap()).stderr(Stdio::piped());
            let out = cmd.output().unwrap();
            assert_eq!(out.status.code(), Some(code), "{shell_name} {arg:?}: {}", text(&out.stderr));
        }
        assert_eq!(
            fs::read_to_string(&gh_output).unwrap(),
            "earlier=1\nversion=1.4.2\ntags=v1.4.2 1.4 1 latest\nversion=1.4.3-rc.2\ntags=v1.4.3-rc.2\n",
            "{shell_name}"
        );
        assert!(!dir.path().join(PWNED).exists(), "{shell_name}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// image-pin.sh check / get
// ---------------------------------------------------------------------------------------------------------------

enum PinWant {
    /// `check` exits 0 silently (or with the placeholder warning); `get` prints `value`.
    Valid { value: &'static str, placeholder: bool },
    /// `check` and `get` exit 1 with a message naming the file (and `line`, when there is one) and containing
    /// `says`; `get` prints nothing.
    Invalid { line: Option<usize>, says: &'static str },
}

struct PinCase {
    /// File contents; `{H}` is a valid digest's hex, `{Z}` the all-zero one, `{DIR}` the case's temp dir.
    content: &'static str,
    want: PinWant,
}

const fn valid(content: &'static str, value: &'static str) -> PinCase {
    PinCase { content, want: PinWant::Valid { value, placeholder: false } }
}

const fn invalid(content: &'static str, line: Option<usize>, says: &'static str) -> PinCase {
    PinCase { content, want: PinWant::Invalid { line, says } }
}

const PIN_CASES: &[PinCase] = &[
    valid(
        "# pinned by the release workflow\n\nRM_IMAGE=git.example.com/restic-manager/restic-manager@sha256:{H}\n",
        "git.example.com/restic-manager/restic-manager@sha256:{H}",
    ),
    valid(
        "RM_IMAGE=registry.example.com:5000/team/sub/restic-manager@sha256:{H}\n",
        "registry.example.com:5000/team/sub/restic-manager@sha256:{H}",
    ),
    valid("RM_IMAGE=localhost:5000/rm@sha256:{H}\n", "localhost:5000/rm@sha256:{H}"),
    valid("RM_IMAGE=127.0.0.1:5000/a/b/c@sha256:{H}\n", "127.0.0.1:5000/a/b/c@sha256:{H}"),
    valid("RM_IMAGE=Registry.Example.com/rm@sha256:{H}\n", "Registry.Example.com/rm@sha256:{H}"),
    valid("RM_IMAGE=restic-manager@sha256:{H}\n", "restic-manager@sha256:{H}"),
    valid("RM_IMAGE=library/foo_bar.baz-qux@sha256:{H}\n", "library/foo_bar.baz-qux@sha256:{H}"),
    valid("# no newline at the end\nRM_IMAGE=rm@sha256:{H}", "rm@sha256:{H}"),
    valid("\n\n# a $(touch {DIR}/pwned) `touch {DIR}/pwned` comment\n\nRM_IMAGE=rm@sha256:{H}\n\n", "rm@sha256:{H}"),
    PinCase {
        content: "# placeholder\nRM_IMAGE=git.example.com/rm/rm@sha256:{Z}\n",
        want: PinWant::Valid { value: "git.example.com/rm/rm@sha256:{Z}", placeholder: true },
    },
    // Tags.
    invalid("# pin\nRM_IMAGE=git.example.com/rm/rm:1.2.3\n", Some(2), "RM_IMAGE is pinned by tag"),
    invalid("RM_IMAGE=git.example.com/rm/rm:1.2.3@sha256:{H}\n", Some(1), "pinned by tag as well as digest"),
    invalid("RM_IMAGE=localhost:5000/rm:latest\n", Some(1), "RM_IMAGE is pinned by tag"),
    invalid("RM_IMAGE=rm:latest\n", Some(1), "pin a digest: NAME@sha256:"),
    invalid("RM_IMAGE=git.example.com/rm/rm\n", Some(1), "has no digest"),
    // Missing and duplicate lines.
    invalid("# only comments\n\n", None, "no RM_IMAGE line"),
    invalid("", None, "no RM_IMAGE line"),
    invalid("RM_IMAGE=rm@sha256:{H}\n# again\nRM_IMAGE=rm@sha256:{H}\n", Some(3), "duplicate RM_IMAGE line"),
    // Quotes, whitespace, trailing garbage.
    invalid("RM_IMAGE=\"rm@sha256:{H}\"\n", Some(1), "quoted"),
    invalid("RM_IMAGE='rm@sha256:{H}'\n", Some(1), "quoted"),
    invalid("RM_IMAGE=rm@sha256:{H} \n", Some(1), "trailing whitespace"),
    invalid("RM_IMAGE=rm@sha256:{H}\t\n", Some(1), "trailing whitespace"),
    invalid("RM_IMAGE=rm@sha256:{H} # latest\n", Some(1), "whitespace"),
    invalid("RM_IMAGE=rm@sha256:{H}junk\n", Some(1), "not sha256:<64 lowercase hex digits>"),
    invalid("RM_IMAGE=rm@sha256:{H}:latest\n", Some(1), "not sha256:<64 lowercase hex digits>"),
    invalid("RM_IMAGE=rm@sha256:{H}\r\n", Some(1), "carriage return"),
    invalid("RM_IMAGE=\n", Some(1), "RM_IMAGE is empty"),
    invalid("RM_IMAGE = rm@sha256:{H}\n", Some(1), "whitespace around '='"),
    invalid("  # indented comment\nRM_IMAGE=rm@sha256:{H}\n", Some(1), "leading whitespace"),
    invalid(" RM_IMAGE=rm@sha256:{H}\n", Some(1), "leading whitespace"),
    invalid("export RM_IMAGE=rm@sha256:{H}\n", Some(1), "'export' is not allowed"),
    // Digests.
    invalid(
        "RM_IMAGE=rm@sha256:4F53CDA18C2BAA0C0354BB5F9A3ECBE5ED12AB4D8E11BA873C2F11161202B945\n",
        Some(1),
        "uppercase",
    ),
    invalid(
        "RM_IMAGE=rm@sha256:4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b94\n",
        Some(1),
        "63 hex digits",
    ),
    invalid(
        "RM_IMAGE=rm@sha256:4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b9450\n",
        Some(1),
        "65 hex digits",
    ),
    invalid("RM_IMAGE=rm@sha256:4f53cda1\n", Some(1), "8 hex digits"),
    invalid("RM_IMAGE=rm@sha256:\n", Some(1), "not sha256:"),
    invalid("RM_IMAGE=rm@sha512:{H}\n", Some(1), "is not sha256:"),
    invalid("RM_IMAGE=rm@{H}\n", Some(1), "is not sha256:"),
    invalid("RM_IMAGE=rm@sha256:{H}@sha256:{H}\n", Some(1), "more than one '@'"),
    // Names.
    invalid("RM_IMAGE=git.example.com/RM/rm@sha256:{H}\n", Some(1), "not a repository name"),
    invalid("RM_IMAGE=Restic/rm@sha256:{H}\n", Some(1), "not a repository name"),
    invalid("RM_IMAGE=-bad.example.com/rm@sha256:{H}\n", Some(1), "not a repository name"),
    invalid("RM_IMAGE=registry.example.com:http/rm@sha256:{H}\n", Some(1), "not a repository name"),
    invalid("RM_IMAGE=a//b@sha256:{H}\n", Some(1), "not a repository name"),
    invalid("RM_IMAGE=a/b/@sha256:{H}\n", Some(1), "not a repository name"),
    invalid("RM_IMAGE=a/b..c@sha256:{H}\n", Some(1), "not a repository name"),
    invalid("RM_IMAGE=_a@sha256:{H}\n", Some(1), "not a repository name"),
    invalid("RM_IMAGE=@sha256:{H}\n", Some(1), "not a repository name"),
    // Other lines.
    invalid("RM_IMAGE=rm@sha256:{H}\nFOO=bar\n", Some(2), "unexpected setting FOO"),
    invalid("hello\nRM_IMAGE=rm@sha256:{H}\n", Some(1), "unexpected line"),
    // Shell syntax: rejected, never run.
    invalid("RM_IMAGE=rm@sha256:$(touch {DIR}/pwned)\n", Some(1), "contains '$' or a backtick"),
    invalid("RM_IMAGE=`touch {DIR}/pwned`\n", Some(1), "contains '$' or a backtick"),
    invalid("RM_IMAGE=rm@sha256:{H};touch\n", Some(1), "characters no image reference has"),
    invalid("# ok\nRM_IMAGE=${HOME}/rm@sha256:{H}\n", Some(2), "contains '$' or a backtick"),
];

fn expand(template: &str, dir: &Path) -> String {
    template.replace("{H}", HEX).replace("{Z}", ZEROS).replace("{DIR}", dir.to_str().expect("UTF-8 temp path"))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn image_pin_check_and_get_table() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for (shell_name, shell) in shells() {
        for case in PIN_CASES {
            let dir = tempdir();
            let content = expand(case.content, dir.path());
            fs::write(dir.path().join("pin.env"), &content).unwrap();
            let check = run_in(shell, PIN_SCRIPT, &args(&["check", "pin.env"]), dir.path());
            let get = run_in(shell, PIN_SCRIPT, &args(&["get", "pin.env"]), dir.path());
            runs += 2;
            let mut problems = Vec::new();
            for (cmd, out) in [("check", &check), ("get", &get)] {
                let stderr = text(&out.stderr);
                match case.want {
                    PinWant::Valid { value, placeholder } => {
                        let want_stdout =
                            if cmd == "get" { format!("{}\n", expand(value, dir.path())) } else { String::new() };
                        if out.status.code() != Some(0) || text(&out.stdout) != want_stdout {
                            problems
                                .push(format!("{cmd}: wanted exit 0 and stdout {want_stdout:?}\n{}", describe(out)));
                        }
                        let warned = stderr.contains("no release pinned yet") && stderr.contains("pin.env:");
                        if placeholder != warned || (!placeholder && !stderr.is_empty()) {
                            problems
                                .push(format!("{cmd}: placeholder warning expected: {placeholder}\n{}", describe(out)));
                        }
                    }
                    PinWant::Invalid { line, says } => {
                        let at = match line {
                            Some(n) => format!("image-pin: pin.env:{n}: "),
                            None => "image-pin: pin.env: ".to_string(),
                        };
                        if out.status.code() != Some(1)
                            || !out.stdout.is_empty()
                            || !stderr.contains(&at)
                            || !stderr.contains(says)
                        {
                            problems.push(format!(
                                "{cmd}: wanted exit 1, no stdout, {at:?} and {says:?}\n{}",
                                describe(out)
                            ));
                        }
                        if stderr.lines().any(|l| !l.starts_with("image-pin: ")) {
                            problems
                                .push(format!("{cmd}: a stderr line that is not the script's own\n{}", describe(out)));
                        }
                    }
                }
            }
            if dir.path().join(PWNED).exists() {
                problems.push(format!("{PWNED} was created: the file was evaluated"));
            }
            if entries(dir.path()) != ["pin.env"] {
                problems.push(format!("check/get changed the directory: {:?}", entries(dir.path())));
            }
            if fs::read_to_string(dir.path().join("pin.env")).unwrap() != content {
                problems.push("check/get changed the file".into());
            }
            if !problems.is_empty() {
                failures.push(format!("{shell_name}, file {content:?}:\n{}", problems.join("\n")));
            }
        }
    }
    eprintln!("image-pin.sh check/get: {} cases, {runs} runs", PIN_CASES.len());
    assert_no_failures(failures, "image-pin check/get cases");
}

/// The committed pin is the placeholder: `check` passes with a warning, `get` prints it, with and without FILE.
#[test]
fn committed_pin_file_passes_check_with_placeholder_warning() {
    let pin = repo_file("deploy/image-pin.env");
    let content = fs::read_to_string(&pin).unwrap();
    let placeholder = format!("git.example.com/restic-manager/restic-manager@sha256:{ZEROS}");
    assert!(content.lines().any(|l| l == format!("RM_IMAGE={placeholder}")), "{content}");
    assert!(
        content
            .lines()
            .any(|l| l.starts_with('#')
                && l.to_lowercase().contains("placeholder until the first release records a digest")),
        "the placeholder is not explained:\n{content}"
    );
    for want in ["docker-compose --env-file deploy/image-pin.env -f deploy/compose.yaml", "scripts/image-pin.sh check"]
    {
        assert!(content.contains(want), "the header does not mention {want:?}:\n{content}");
    }
    let dir = tempdir();
    for (shell_name, shell) in shells() {
        for file_arg in [vec![], vec![pin.to_str().unwrap().to_string()]] {
            for cmd in ["check", "get"] {
                let mut a = vec![cmd.to_string()];
                a.extend(file_arg.iter().cloned());
                let out = run_in(shell, PIN_SCRIPT, &a, dir.path());
                let stderr = text(&out.stderr);
                assert_eq!(out.status.code(), Some(0), "{shell_name} {a:?}: {}", describe(&out));
                assert!(
                    stderr.contains("warning") && stderr.contains("no release pinned yet"),
                    "{shell_name} {a:?}: {}",
                    describe(&out)
                );
                let want = if cmd == "get" { format!("{placeholder}\n") } else { String::new() };
                assert_eq!(text(&out.stdout), want, "{shell_name} {a:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// image-pin.sh set
// ---------------------------------------------------------------------------------------------------------------

fn new_ref() -> String {
    format!("git.example.com:8443/restic-manager/restic-manager@sha256:{HEX}")
}

#[test]
fn set_replaces_the_line_in_place_keeping_everything_else() {
    for (shell_name, shell) in shells() {
        let dir = tempdir();
        let pin = dir.path().join("pin.env");
        let before = format!(
            "# The pin.\n#   with $(touch {0}/pwned) in a comment\n\n# placeholder\nRM_IMAGE=old/rm@sha256:{ZEROS}\n# after\n\n",
            dir.path().display()
        );
        fs::write(&pin, &before).unwrap();
        fs::set_permissions(&pin, fs::Permissions::from_mode(0o640)).unwrap();
        let out = run_in(shell, PIN_SCRIPT, &args(&["set", "pin.env", &new_ref()]), dir.path());
        assert_eq!(out.status.code(), Some(0), "{shell_name}: {}", describe(&out));
        assert!(out.stdout.is_empty(), "{shell_name}: {}", describe(&out));
        let after = fs::read_to_string(&pin).unwrap();
        assert_eq!(
            after,
            before.replace(&format!("RM_IMAGE=old/rm@sha256:{ZEROS}"), &format!("RM_IMAGE={}", new_ref()))
        );
        assert_eq!(mode(&pin), 0o640, "{shell_name}: mode not kept");
        assert_eq!(entries(dir.path()), ["pin.env"], "{shell_name}: temp file left behind");

        // The result passes check and get reads it back; setting it again changes nothing.
        let get = run_in(shell, PIN_SCRIPT, &args(&["get", "pin.env"]), dir.path());
        assert_eq!(text(&get.stdout), format!("{}\n", new_ref()), "{shell_name}: {}", describe(&get));
        let again = run_in(shell, PIN_SCRIPT, &args(&["set", "pin.env", &new_ref()]), dir.path());
        assert_eq!(again.status.code(), Some(0), "{shell_name}: {}", describe(&again));
        assert_eq!(fs::read_to_string(&pin).unwrap(), after, "{shell_name}");

        // Back to the placeholder: allowed, with the warning.
        let zero = format!("old/rm@sha256:{ZEROS}");
        let out = run_in(shell, PIN_SCRIPT, &args(&["set", "pin.env", &zero]), dir.path());
        assert_eq!(out.status.code(), Some(0), "{shell_name}: {}", describe(&out));
        assert!(text(&out.stderr).contains("no release pinned yet"), "{shell_name}: {}", describe(&out));
        assert_eq!(fs::read_to_string(&pin).unwrap(), before, "{shell_name}");
        assert!(!dir.path().join(PWNED).exists(), "{shell_name}: a comment was evaluated");
        assert_eq!(entries(dir.path()), ["pin.env"], "{shell_name}");
    }
}

#[test]
fn set_appends_the_line_when_the_file_has_none() {
    for (shell_name, shell) in shells() {
        let dir = tempdir();
        let pin = dir.path().join("pin.env");
        fs::write(&pin, "# comments only, no newline at the end").unwrap();
        let out = run_in(shell, PIN_SCRIPT, &args(&["set", "pin.env", &new_ref()]), dir.path());
        assert_eq!(out.status.code(), Some(0), "{shell_name}: {}", describe(&out));
        assert_eq!(
            fs::read_to_string(&pin).unwrap(),
            format!("# comments only, no newline at the end\nRM_IMAGE={}\n", new_ref()),
            "{shell_name}"
        );
        assert_eq!(entries(dir.path()), ["pin.env"], "{shell_name}");
    }
}

#[test]
fn set_creates_a_missing_file_with_a_header() {
    for (shell_name, shell) in shells() {
        let dir = tempdir();
        let pin = dir.path().join("pin.env");
        // Under umask 027 the new file is 0640: created like any file, not left at mktemp's 0600.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"umask 027 && exec "$@""#, "sh"])
            .args(shell)
            .arg(repo_file(PIN_SCRIPT))
            .args(["set", "pin.env", &new_ref()])
            .current_dir(dir.path())
            .stdin(Stdio::null());
        let out = run_bounded(cmd, TIMEOUT);
        assert_eq!(out.status.code(), Some(0), "{shell_name}: {}", describe(&out));
        let content = fs::read_to_string(&pin).unwrap();
        let lines: Vec<&str> = content.lines().collect();
        assert!(lines.len() >= 2 && lines[..lines.len() - 1].iter().all(|l| l.starts_with('#')), "{content}");
        assert_eq!(lines.last().copied(), Some(format!("RM_IMAGE={}", new_ref()).as_str()), "{content}");
        assert_eq!(mode(&pin), 0o640, "{shell_name}: mode of a created file");
        assert_eq!(entries(dir.path()), ["pin.env"], "{shell_name}: temp file left behind");
        let check = run_in(shell, PIN_SCRIPT, &args(&["check", "pin.env"]), dir.path());
        assert_eq!(check.status.code(), Some(0), "{shell_name}: {}", describe(&check));
        assert!(check.stderr.is_empty(), "{shell_name}: {}", describe(&check));
    }
}

/// Every refused `set` leaves the file byte-identical (and its mode), creates nothing and runs nothing.
#[test]
fn refused_set_leaves_the_file_untouched() {
    let good = format!("# pin\nRM_IMAGE=rm@sha256:{HEX}\n");
    // (file contents or None for a missing file, REF, exit code, message)
    let cases: Vec<(Option<String>, String, i32, &str)> = vec![
        (Some(good.clone()), "git.example.com/rm/rm:1.2.3".into(), 1, "RM_IMAGE is pinned by tag"),
        (Some(good.clone()), format!("git.example.com/rm/rm:1.2.3@sha256:{HEX}"), 1, "tag as well as digest"),
        (Some(good.clone()), format!("rm@sha256:{}", HEX.to_uppercase()), 1, "uppercase"),
        (Some(good.clone()), "rm@sha256:4f53cda1".into(), 1, "8 hex digits"),
        (Some(good.clone()), format!("rm@sha256:{HEX} "), 1, "trailing whitespace"),
        (Some(good.clone()), format!("\"rm@sha256:{HEX}\""), 1, "quoted"),
        (Some(good.clone()), format!("rm@sha256:{HEX}\nFOO=bar"), 1, "characters no image reference has"),
        (Some(good.clone()), "rm@sha256:$(touch {DIR}/pwned)".into(), 1, "contains '$' or a backtick"),
        (Some(good.clone()), "`touch {DIR}/pwned`".into(), 1, "contains '$' or a backtick"),
        (Some(good.clone()), String::new(), 1, "RM_IMAGE is empty"),
        (Some(format!("RM_IMAGE=a@sha256:{HEX}\nRM_IMAGE=b@sha256:{HEX}\n")), new_ref(), 1, "2 RM_IMAGE lines"),
        (Some(format!("RM_IMAGE=a@sha256:{HEX}\nFOO=bar\n")), new_ref(), 1, "pin.env:2: unexpected setting FOO"),
        (Some(format!("  # indented\nRM_IMAGE=a@sha256:{HEX}\n")), new_ref(), 1, "pin.env:1: leading whitespace"),
        (None, "rm:latest".into(), 1, "RM_IMAGE is pinned by tag"),
    ];
    for (shell_name, shell) in shells() {
        for (content, reference, code, says) in &cases {
            let dir = tempdir();
            let pin = dir.path().join("pin.env");
            if let Some(content) = content {
                fs::write(&pin, content).unwrap();
                fs::set_permissions(&pin, fs::Permissions::from_mode(0o604)).unwrap();
            }
            let before_entries = entries(dir.path());
            let reference = expand(reference, dir.path());
            let out = run_in(shell, PIN_SCRIPT, &args(&["set", "pin.env", &reference]), dir.path());
            let context = format!("{shell_name} set {reference:?} on {content:?}: {}", describe(&out));
            assert_eq!(out.status.code(), Some(*code), "{context}");
            assert!(out.stdout.is_empty(), "{context}");
            let stderr = text(&out.stderr);
            assert!(stderr.contains(says) && stderr.contains("pin.env"), "{context}");
            assert!(stderr.lines().all(|l| l.starts_with("image-pin: ")), "{context}");
            assert_eq!(entries(dir.path()), before_entries, "{context}");
            if let Some(content) = content {
                assert_eq!(fs::read(&pin).unwrap(), content.as_bytes(), "{context}");
                assert_eq!(mode(&pin), 0o604, "{context}");
            }
        }
    }
}

#[test]
fn set_needs_an_existing_directory() {
    for (shell_name, shell) in shells() {
        let dir = tempdir();
        let out = run_in(shell, PIN_SCRIPT, &args(&["set", "missing/pin.env", &new_ref()]), dir.path());
        assert_eq!(out.status.code(), Some(1), "{shell_name}: {}", describe(&out));
        assert!(text(&out.stderr).contains("does not exist"), "{shell_name}: {}", describe(&out));
        assert!(entries(dir.path()).is_empty(), "{shell_name}");
    }
}

#[test]
fn image_pin_usage_errors_exit_2() {
    let cases: &[&[&str]] =
        &[&[], &["bogus"], &["check", "a", "b"], &["get", "a", "b"], &["set", "a"], &["set"], &["set", "a", "b", "c"]];
    for (shell_name, shell) in shells() {
        let dir = tempdir();
        for case in cases {
            let out = run_in(shell, PIN_SCRIPT, &args(case), dir.path());
            assert_eq!(out.status.code(), Some(2), "{shell_name} {case:?}: {}", describe(&out));
            assert!(out.stdout.is_empty(), "{shell_name} {case:?}");
            assert!(text(&out.stderr).starts_with("usage: "), "{shell_name} {case:?}: {}", describe(&out));
        }
        let out = run_in(shell, PIN_SCRIPT, &args(&["check", "nope.env"]), dir.path());
        assert_eq!(out.status.code(), Some(1), "{shell_name}: {}", describe(&out));
        assert!(text(&out.stderr).contains("nope.env: no such file"), "{shell_name}: {}", describe(&out));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The scripts themselves
// ---------------------------------------------------------------------------------------------------------------

/// The pin is data: image-pin.sh never sources, evaluates or `.`-includes anything.
#[test]
fn image_pin_never_evaluates_the_file() {
    let script = fs::read_to_string(repo_file(PIN_SCRIPT)).unwrap();
    for (n, line) in script.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = code.split(|c: char| c.is_whitespace() || c == ';' || c == '(').collect();
        assert!(!words.iter().any(|w| *w == "eval" || *w == "source" || *w == "."), "{PIN_SCRIPT}:{}: {line}", n + 1);
    }
}

#[test]
fn shellcheck_and_posix_shells() {
    for script in [TAGS_SCRIPT, PIN_SCRIPT] {
        let path = repo_file(script);
        for (name, shell) in shells() {
            let mut cmd = Command::new(shell[0]);
            cmd.args(&shell[1..]).arg("-n").arg(&path);
            let out = run_bounded(cmd, TIMEOUT);
            assert!(out.status.success(), "{name} -n {script}: {}", describe(&out));
        }
        if have("shellcheck") {
            let mut cmd = Command::new("shellcheck");
            cmd.args(["-s", "sh"]).arg(&path);
            let out = run_bounded(cmd, Duration::from_secs(60));
            assert!(out.status.success(), "shellcheck -s sh {script}: {}", describe(&out));
        } else {
            eprintln!("NOTE: shellcheck is not installed; skipping it for {script}");
        }
    }
}
