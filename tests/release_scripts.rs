//! Table tests of the release helpers, run by every POSIX shell available (`dash`, `sh`, `busybox sh`):
//! `scripts/release-tags.sh` (the version and image tags of a tag push or a manual dispatch),
//! `scripts/image-pin.sh` (the digest pin in `deploy/image-pin.env`: check, get, set),
//! `scripts/release-image.sh` (registry and image name), `scripts/release-meta.sh` (the workflow's meta step, against
//! a throw-away git repo), `scripts/release-publish.sh` (the Gitea release and its assets, against a mock Gitea API
//! on 127.0.0.1) and `scripts/release-pin.sh` (the pin commit on main, against a real local bare repo, retries
//! included). No docker. Shellcheck runs once over scripts/*.sh in `make lint`, not here.
//!
//! Hostile inputs (`$(touch …)`, backticks, newlines) name a file in the case's temp dir; each test asserts that the
//! file was never created, that stdout stayed empty and that messages echo nothing that could form an extra line.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rm_e2e::{have, repo_file, run_bounded};

/// Bound for one run of a script (normally a few milliseconds).
const TIMEOUT: Duration = Duration::from_secs(20);

/// The shells the scripts must work under, when installed: (name for messages, program and leading arguments).
const CANDIDATE_SHELLS: [(&str, &[&str]); 3] =
    [("dash", &["dash"]), ("sh", &["sh"]), ("busybox sh", &["busybox", "sh"])];

const TAGS_SCRIPT: &str = "scripts/release-tags.sh";
const PIN_SCRIPT: &str = "scripts/image-pin.sh";
const IMAGE_SCRIPT: &str = "scripts/release-image.sh";
const META_SCRIPT: &str = "scripts/release-meta.sh";
const PUBLISH_SCRIPT: &str = "scripts/release-publish.sh";
const RELEASE_PIN_SCRIPT: &str = "scripts/release-pin.sh";

/// Every script whose syntax the POSIX shells must accept.
const ALL_SCRIPTS: [&str; 6] = [TAGS_SCRIPT, PIN_SCRIPT, IMAGE_SCRIPT, META_SCRIPT, PUBLISH_SCRIPT, RELEASE_PIN_SCRIPT];

/// Variables the workflow hands the scripts through `env:`; inherited values are dropped before each run.
const WORKFLOW_ENV: [&str; 8] = ["EVENT", "REF", "SHA", "SERVER_URL", "OWNER", "REGISTRY_VAR", "IMAGE_NAME_VAR", "TAG"];

/// A valid digest and its variants.
const HEX: &str = "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945";
const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The file a hostile input tries to create (relative to the case's temp dir, which is also the working dir).
const PWNED: &str = "pwned";

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

/// The candidate shells that are installed (`sh` always is). A missing one makes the calling test count as skipped
/// (and fail under CI, where `.ci/run` installs dash and busybox); the installed ones still run.
fn shells() -> Vec<(&'static str, &'static [&'static str])> {
    let found: Vec<_> = CANDIDATE_SHELLS
        .into_iter()
        .filter(|(name, shell)| {
            let ok = have(shell[0]);
            if !ok {
                rm_e2e::skip(format!("{name} is not installed (apt-get install dash busybox)"));
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
    run_env(shell, script, args, cwd, &[])
}

/// `run_in` with `env` set on top of the cleaned environment.
fn run_env(shell: &[&str], script: &str, args: &[String], cwd: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(shell[0]);
    cmd.args(&shell[1..]).arg(repo_file(script)).args(args).current_dir(cwd).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("RM_")
            || k.starts_with("GITHUB_")
            || k.starts_with("RELEASE_")
            || k.starts_with("GIT_")
            || k.starts_with("LC_")
            || k == "LANG"
            || WORKFLOW_ENV.contains(&k.as_ref())
        {
            cmd.env_remove(&key);
        }
    }
    cmd.envs(env.iter().copied());
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
// release-image.sh
// ---------------------------------------------------------------------------------------------------------------

/// The workflow's variables for one case: `SERVER_URL`, `OWNER`, `REGISTRY_VAR`, `IMAGE_NAME_VAR` (unset when `None`).
struct ImageCase {
    server_url: Option<&'static str>,
    owner: Option<&'static str>,
    registry: Option<&'static str>,
    image_name: Option<&'static str>,
    /// `Ok((registry, image))`, or `Err(message part)` for a refusal (exit 1, empty stdout).
    want: Result<(&'static str, &'static str), &'static str>,
}

const fn image_case(
    server_url: Option<&'static str>,
    owner: Option<&'static str>,
    registry: Option<&'static str>,
    image_name: Option<&'static str>,
    want: Result<(&'static str, &'static str), &'static str>,
) -> ImageCase {
    ImageCase { server_url, owner, registry, image_name, want }
}

const GITEA: Option<&str> = Some("https://git.example.org");

const IMAGE_CASES: &[ImageCase] = &[
    // Defaults: the host of the Gitea instance, <owner>/restic-manager, lowercased.
    image_case(GITEA, Some("acme"), None, None, Ok(("git.example.org", "git.example.org/acme/restic-manager"))),
    image_case(
        Some("https://Git.Example.ORG:3000/sub/path"),
        Some("Acme-Corp"),
        None,
        None,
        Ok(("git.example.org:3000", "git.example.org:3000/acme-corp/restic-manager")),
    ),
    image_case(
        Some("http://127.0.0.1:3000/"),
        Some("a"),
        None,
        None,
        Ok(("127.0.0.1:3000", "127.0.0.1:3000/a/restic-manager")),
    ),
    image_case(
        Some("git.example.org"),
        Some("acme"),
        None,
        None,
        Ok(("git.example.org", "git.example.org/acme/restic-manager")),
    ),
    // Empty variables count as unset, as ${VAR:-default} does in the workflow.
    image_case(GITEA, Some("acme"), Some(""), Some(""), Ok(("git.example.org", "git.example.org/acme/restic-manager"))),
    // vars.REGISTRY and vars.IMAGE_NAME.
    image_case(
        GITEA,
        Some("acme"),
        Some("Registry.Example.com:5000"),
        None,
        Ok(("registry.example.com:5000", "registry.example.com:5000/acme/restic-manager")),
    ),
    image_case(GITEA, Some("acme"), None, Some("Team/Sub/RM"), Ok(("git.example.org", "git.example.org/team/sub/rm"))),
    image_case(
        None,
        None,
        Some("reg.example.com"),
        Some("x/y_z.w-1"),
        Ok(("reg.example.com", "reg.example.com/x/y_z.w-1")),
    ),
    // Unusable names.
    image_case(None, Some("acme"), None, None, Err("unusable image name '/acme/restic-manager'")),
    image_case(None, None, None, None, Err("unusable image name")),
    image_case(GITEA, None, None, None, Err("unusable image name 'git.example.org//restic-manager'")),
    image_case(GITEA, Some(""), None, None, Err("unusable image name")),
    image_case(GITEA, Some("acme"), None, Some("acme/rm/"), Err("unusable image name")),
    image_case(GITEA, Some("acme"), None, Some("/rm"), Err("unusable image name")),
    image_case(GITEA, Some("acme"), None, Some("acme rm"), Err("unusable image name")),
    image_case(GITEA, Some("ächme"), None, None, Err("unusable image name")),
    image_case(Some("https://user:pw@git.example.org"), Some("acme"), None, None, Err("unusable image name")),
    // Hostile values: never evaluated, never echoed raw, nothing on stdout.
    image_case(GITEA, Some("$(touch {DIR}/pwned)"), None, None, Err("unusable image name")),
    image_case(GITEA, Some("`touch {DIR}/pwned`"), None, None, Err("unusable image name")),
    image_case(GITEA, Some("acme"), Some("reg;touch {DIR}/pwned"), None, Err("unusable image name")),
    image_case(GITEA, Some("acme"), None, Some("acme/rm\nimage=evil/x"), Err("unusable image name")),
    image_case(GITEA, Some("acme\nregistry=evil"), None, None, Err("unusable image name")),
    image_case(
        Some("https://git.example.org/$(touch {DIR}/pwned)"),
        Some("a&&touch {DIR}/pwned"),
        None,
        None,
        Err("unusable"),
    ),
];

#[test]
fn release_image_table() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for (shell_name, shell) in shells() {
        for case in IMAGE_CASES {
            let dir = tempdir();
            let d = dir.path().to_str().unwrap();
            let vars = [
                ("SERVER_URL", case.server_url),
                ("OWNER", case.owner),
                ("REGISTRY_VAR", case.registry),
                ("IMAGE_NAME_VAR", case.image_name),
            ];
            let values: Vec<(&str, String)> =
                vars.iter().filter_map(|(k, v)| v.map(|v| (*k, v.replace("{DIR}", d)))).collect();
            let env: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let out = run_env(shell, IMAGE_SCRIPT, &[], dir.path(), &env);
            runs += 1;
            let stderr = text(&out.stderr);
            let mut problems = Vec::new();
            match case.want {
                Ok((registry, image)) => {
                    let want = format!("registry={registry}\nimage={image}\n");
                    if out.status.code() != Some(0) || text(&out.stdout) != want || !stderr.is_empty() {
                        problems.push(format!("wanted exit 0 and stdout\n{want}"));
                    }
                }
                Err(says) => {
                    if out.status.code() != Some(1) || !out.stdout.is_empty() || !stderr.contains(says) {
                        problems.push(format!("wanted exit 1, no stdout, {says:?} on stderr"));
                    }
                    if stderr.lines().count() != 1 || !stderr.starts_with("release-image: ") {
                        problems.push("stderr should be one line of the script's own".into());
                    }
                    if stderr.contains('`') || stderr.contains("$(") {
                        problems.push("stderr echoes hostile text raw".into());
                    }
                }
            }
            if dir.path().join(PWNED).exists() {
                problems.push(format!("{PWNED} was created: a value was evaluated"));
            }
            if !problems.is_empty() {
                failures.push(format!(
                    "{shell_name} release-image.sh {env:?}: {}\n{}",
                    problems.join("; "),
                    describe(&out)
                ));
            }
        }
        // Arguments are a usage error.
        let dir = tempdir();
        let out = run_env(shell, IMAGE_SCRIPT, &args(&["acme"]), dir.path(), &[("SERVER_URL", "https://g.example")]);
        if out.status.code() != Some(2) || !out.stdout.is_empty() || !text(&out.stderr).starts_with("usage: ") {
            failures.push(format!("{shell_name} release-image.sh acme: wanted a usage error\n{}", describe(&out)));
        }
    }
    eprintln!("release-image.sh: {} cases, {runs} runs", IMAGE_CASES.len());
    assert_no_failures(failures, "release-image cases");
}

// ---------------------------------------------------------------------------------------------------------------
// git fixtures (release-meta.sh, release-pin.sh)
// ---------------------------------------------------------------------------------------------------------------

/// A fixed identity and no user or system configuration: the fixtures do not depend on the machine's git setup.
const GIT_ENV: [(&str, &str); 8] = [
    ("GIT_CONFIG_NOSYSTEM", "1"),
    ("GIT_CONFIG_GLOBAL", "/dev/null"),
    ("GIT_AUTHOR_NAME", "Test"),
    ("GIT_AUTHOR_EMAIL", "test@example.invalid"),
    ("GIT_COMMITTER_NAME", "Test"),
    ("GIT_COMMITTER_EMAIL", "test@example.invalid"),
    ("GIT_AUTHOR_DATE", "2026-03-04T05:06:07+02:00"),
    ("GIT_COMMITTER_DATE", "2026-03-04T05:06:07+02:00"),
];

/// `git <args>` in `dir` with `GIT_ENV`; panics on failure; returns stdout, trimmed.
fn git(dir: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new("git");
    cmd.args(args).current_dir(dir).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("GIT_") {
            cmd.env_remove(&key);
        }
    }
    cmd.envs(GIT_ENV);
    let out = run_bounded(cmd, TIMEOUT);
    assert!(out.status.success(), "git {args:?} in {}: {}", dir.display(), describe(&out));
    text(&out.stdout).trim().to_string()
}

// ---------------------------------------------------------------------------------------------------------------
// release-meta.sh
// ---------------------------------------------------------------------------------------------------------------

/// A repo with one commit (committed 2026-03-04T03:06:07Z) tagged v1.2.3 (annotated) and v2.0.0-rc.1 (light).
/// Returns (commit, annotated tag object id).
fn meta_repo(dir: &Path) -> (String, String) {
    git(dir, &["init", "-q", "-b", "main"]);
    fs::write(dir.join("README"), "x\n").unwrap();
    git(dir, &["add", "README"]);
    git(dir, &["commit", "-q", "-m", "one"]);
    git(dir, &["tag", "-a", "-m", "v1.2.3", "v1.2.3"]);
    git(dir, &["tag", "v2.0.0-rc.1"]);
    (git(dir, &["rev-parse", "HEAD"]), git(dir, &["rev-parse", "v1.2.3"]))
}

#[test]
fn release_meta_table() {
    let repo = tempdir();
    let (commit, tag_object) = meta_repo(repo.path());
    assert_ne!(commit, tag_object);
    let d = repo.path().to_str().unwrap().to_string();
    let image = "git.example.org/acme/restic-manager";
    let lines = |version: &str, tags: &str| {
        let refs: Vec<String> = tags.split(' ').map(|t| format!("{image}:{t}")).collect();
        format!(
            "version={version}\ntags={tags}\ncommit={commit}\ndate=2026-03-04T03:06:07Z\nregistry=git.example.org\n\
             image={image}\nrefs={}\n",
            refs.join(",")
        )
    };
    let short = &commit[..7];
    // (EVENT, REF, SHA, OWNER, Ok(stdout) or Err((exit, stderr part)))
    type MetaCase<'a> = (&'a str, &'a str, String, &'a str, Result<String, (i32, &'a str)>);
    let cases: Vec<MetaCase> = vec![
        ("push", "refs/tags/v1.2.3", tag_object.clone(), "Acme", Ok(lines("1.2.3", "v1.2.3 1.2 1 latest"))),
        ("push", "refs/tags/v1.2.3", commit.clone(), "acme", Ok(lines("1.2.3", "v1.2.3 1.2 1 latest"))),
        ("push", "refs/tags/v2.0.0-rc.1", commit.clone(), "acme", Ok(lines("2.0.0-rc.1", "v2.0.0-rc.1"))),
        (
            "workflow_dispatch",
            "refs/heads/main",
            commit.clone(),
            "acme",
            Ok(lines(&format!("0.0.0-snapshot-{short}"), &format!("snapshot-{short}"))),
        ),
        ("push", "refs/heads/main", commit.clone(), "acme", Err((1, "release-tags: 'refs/heads/main' is a branch"))),
        ("push", "refs/tags/v1.2.3+b", commit.clone(), "acme", Err((1, "build metadata"))),
        ("push", "refs/tags/v1.2.3", "0".repeat(40), "acme", Err((1, "is not a commit in this repository"))),
        ("push", "refs/tags/v1.2.3", String::new(), "acme", Err((1, "SHA must be"))),
        ("push", "refs/tags/v1.2.3", format!("{commit}$(touch {d}/pwned)"), "acme", Err((1, "SHA must be"))),
        ("push", "refs/tags/v1.2.3", "HEAD".into(), "acme", Err((1, "SHA must be"))),
        ("push", "refs/tags/v1.2.3$(touch {DIR}/pwned)", commit.clone(), "acme", Err((1, "cannot have"))),
        (
            "pull_request",
            "refs/tags/v1.2.3",
            commit.clone(),
            "acme",
            Err((1, "EVENT must be push or workflow_dispatch")),
        ),
        ("", "refs/tags/v1.2.3", commit.clone(), "acme", Err((1, "EVENT must be"))),
        ("push", "refs/tags/v1.2.3", commit.clone(), "", Err((1, "release-image: unusable image name"))),
        ("push", "refs/tags/v1.2.3", commit.clone(), "acme\nrefs=evil", Err((1, "release-image: unusable image name"))),
    ];
    let mut failures = Vec::new();
    for (shell_name, shell) in shells() {
        for (event, reference, sha, owner, want) in &cases {
            let reference = reference.replace("{DIR}", &d);
            let env = [
                ("EVENT", *event),
                ("REF", reference.as_str()),
                ("SHA", sha.as_str()),
                ("SERVER_URL", "https://git.example.org"),
                ("OWNER", *owner),
            ];
            let out = run_env(shell, META_SCRIPT, &[], repo.path(), &env);
            let stderr = text(&out.stderr);
            let ok = match want {
                Ok(stdout) => out.status.code() == Some(0) && text(&out.stdout) == *stdout && stderr.is_empty(),
                Err((code, says)) => {
                    out.status.code() == Some(*code)
                        && out.stdout.is_empty()
                        && stderr.contains(says)
                        && stderr.lines().all(|l| l.starts_with("release-"))
                        && !stderr.contains("$(")
                }
            };
            if !ok || repo.path().join(PWNED).exists() {
                failures.push(format!("{shell_name} release-meta.sh {env:?}: wanted {want:?}\n{}", describe(&out)));
            }
        }
        let out = run_env(shell, META_SCRIPT, &args(&["--bogus"]), repo.path(), &[]);
        if out.status.code() != Some(2) || !out.stdout.is_empty() {
            failures.push(format!("{shell_name} release-meta.sh --bogus: wanted exit 2\n{}", describe(&out)));
        }
    }
    assert_no_failures(failures, "release-meta cases");
}

/// `--github` appends the outputs to $GITHUB_OUTPUT and the REL_* variables to $GITHUB_ENV; a refused run appends
/// nothing to either.
#[test]
fn release_meta_github_appends_everything_or_nothing() {
    let repo = tempdir();
    let (commit, tag_object) = meta_repo(repo.path());
    for (shell_name, shell) in shells() {
        let files = tempdir();
        let gh_output = files.path().join("output");
        let gh_env = files.path().join("env");
        fs::write(&gh_output, "earlier=1\n").unwrap();
        fs::write(&gh_env, "EARLIER=1\n").unwrap();
        let (o, e) = (gh_output.to_str().unwrap(), gh_env.to_str().unwrap());
        for (reference, owner, code) in
            [("refs/tags/v1.2.3", "acme", 0), ("refs/tags/v1.2.3\nlatest=1", "acme", 1), ("refs/tags/v1.2.4", "", 1)]
        {
            let env = [
                ("EVENT", "push"),
                ("REF", reference),
                ("SHA", tag_object.as_str()),
                ("SERVER_URL", "https://git.example.org"),
                ("OWNER", owner),
                ("GITHUB_OUTPUT", o),
                ("GITHUB_ENV", e),
            ];
            let out = run_env(shell, META_SCRIPT, &args(&["--github"]), repo.path(), &env);
            assert_eq!(out.status.code(), Some(code), "{shell_name} {reference:?}: {}", describe(&out));
            assert!(out.stdout.is_empty(), "{shell_name} {reference:?}: {}", describe(&out));
        }
        let image = "git.example.org/acme/restic-manager";
        assert_eq!(
            fs::read_to_string(&gh_output).unwrap(),
            format!(
                "earlier=1\nversion=1.2.3\ntags=v1.2.3 1.2 1 latest\ncommit={commit}\ndate=2026-03-04T03:06:07Z\n\
                 registry=git.example.org\nimage={image}\n\
                 refs={image}:v1.2.3,{image}:1.2,{image}:1,{image}:latest\n"
            ),
            "{shell_name}"
        );
        assert_eq!(
            fs::read_to_string(&gh_env).unwrap(),
            format!(
                "EARLIER=1\nREL_VERSION=1.2.3\nREL_TAGS=v1.2.3 1.2 1 latest\nREL_COMMIT={commit}\n\
                 REL_DATE=2026-03-04T03:06:07Z\nREL_IMAGE={image}\n"
            ),
            "{shell_name}"
        );
        // Without the files --github refuses before doing anything.
        let env = [("EVENT", "push"), ("REF", "v1.2.3"), ("SHA", commit.as_str()), ("OWNER", "a"), ("GITHUB_ENV", e)];
        let out = run_env(shell, META_SCRIPT, &args(&["--github"]), repo.path(), &env);
        assert_eq!(out.status.code(), Some(1), "{shell_name}: {}", describe(&out));
        assert!(text(&out.stderr).contains("needs GITHUB_OUTPUT"), "{shell_name}: {}", describe(&out));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// release-publish.sh against a mock Gitea API
// ---------------------------------------------------------------------------------------------------------------

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123secret";
const API_REPO: &str = "/api/v1/repos/acme/rm";

/// One request the mock received.
#[derive(Clone, Debug)]
struct ApiRequest {
    method: String,
    /// Path and query, relative to `API_REPO` when under it.
    target: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

#[derive(Default)]
struct GiteaState {
    /// (id, tag, the JSON sent to create or update it)
    releases: Vec<(u64, String, serde_json::Value)>,
    /// (id, release id, name, multipart body)
    assets: Vec<(u64, u64, String, Vec<u8>)>,
    next_id: u64,
    requests: Vec<ApiRequest>,
    /// (method, target part, status, body): the first request that matches gets this answer instead.
    fail: Option<(&'static str, &'static str, u16, String)>,
}

/// The few Gitea release endpoints release-publish.sh uses, with state, on 127.0.0.1. Stopped on drop.
struct GiteaMock {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<GiteaState>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GiteaMock {
    fn start() -> GiteaMock {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = std::sync::Arc::new(std::sync::Mutex::new(GiteaState { next_id: 7, ..Default::default() }));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    serve_one(stream, &s);
                }
            }
        });
        GiteaMock { addr, state, stop, thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<ApiRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// "METHOD target" of every request, in order.
    fn calls(&self) -> Vec<String> {
        self.requests().iter().map(|r| format!("{} {}", r.method, r.target)).collect()
    }
}

impl Drop for GiteaMock {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(mut stream: std::net::TcpStream, state: &std::sync::Mutex<GiteaState>) {
    use std::io::{Read, Write};
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (first.next().unwrap_or_default().to_string(), first.next().unwrap_or_default().to_string());
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let length: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let rel = target.strip_prefix(API_REPO).unwrap_or(&target).to_string();
    let request = ApiRequest { method, target: rel, authorization: header("authorization"), body };
    let (status, answer) = answer(&mut state.lock().unwrap(), request, target.starts_with(API_REPO));
    let reason = if status < 300 { "OK" } else { "Error" };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    );
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.flush();
}

fn answer(s: &mut GiteaState, req: ApiRequest, under_repo: bool) -> (u16, String) {
    s.requests.push(req.clone());
    if let Some((m, part, code, body)) = &s.fail {
        if req.method == *m && req.target.contains(part) {
            return (*code, body.clone());
        }
    }
    if !under_repo || req.authorization.as_deref() != Some(&format!("token {TOKEN}")) {
        return (401, r#"{"message":"token is required"}"#.into());
    }
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let not_found = (404, r#"{"message":"not found"}"#.to_string());
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["releases", "tags", tag]) => match s.releases.iter().find(|r| r.1 == *tag) {
            Some((id, tag, _)) => (200, format!(r#"{{"id":{id},"tag_name":"{tag}"}}"#)),
            None => not_found,
        },
        ("POST", ["releases"]) => {
            let Ok(json) = serde_json::from_slice::<serde_json::Value>(&req.body) else { return (400, "{}".into()) };
            let tag = json["tag_name"].as_str().unwrap_or_default().to_string();
            if s.releases.iter().any(|r| r.1 == tag) {
                return (409, r#"{"message":"release exists"}"#.into());
            }
            let id = s.next_id;
            s.next_id += 1;
            s.releases.push((id, tag, json));
            (201, format!(r#"{{"id":{id}}}"#))
        }
        ("PATCH", ["releases", id]) => {
            let Ok(json) = serde_json::from_slice::<serde_json::Value>(&req.body) else { return (400, "{}".into()) };
            match s.releases.iter_mut().find(|r| r.0.to_string() == *id) {
                Some(r) => {
                    r.2 = json;
                    (200, format!(r#"{{"id":{id}}}"#))
                }
                None => not_found,
            }
        }
        ("GET", ["releases", id, "assets"]) => {
            let list: Vec<serde_json::Value> = s
                .assets
                .iter()
                .filter(|a| a.1.to_string() == *id)
                .map(|a| serde_json::json!({"id": a.0, "name": a.2}))
                .collect();
            (200, serde_json::Value::Array(list).to_string())
        }
        ("DELETE", ["releases", id, "assets", asset]) => {
            let before = s.assets.len();
            s.assets.retain(|a| !(a.1.to_string() == *id && a.0.to_string() == *asset));
            if s.assets.len() < before { (204, String::new()) } else { not_found }
        }
        ("POST", ["releases", id, "assets"]) => {
            let Some(name) = query.strip_prefix("name=") else { return (422, "{}".into()) };
            let Ok(release) = id.parse::<u64>() else { return not_found };
            let aid = s.next_id;
            s.next_id += 1;
            s.assets.push((aid, release, name.to_string(), req.body));
            (201, format!(r#"{{"id":{aid},"name":"{name}"}}"#))
        }
        _ => (405, r#"{"message":"unexpected request"}"#.into()),
    }
}

/// A release dir like the workflow's: notes.md, SHA256SUMS, one agent (over 1 MiB, so curl sends `Expect`).
fn release_dir(dir: &Path) -> Vec<String> {
    fs::create_dir_all(dir.join("release/agent-binaries")).unwrap();
    fs::write(dir.join("release/notes.md"), "## restic-manager v1.2.3\n\n\"quotes\", `ticks`, $(not run)\n").unwrap();
    fs::write(dir.join("release/SHA256SUMS"), "abc  agent-binaries/restic-manager-agent-linux-amd64\n").unwrap();
    fs::write(dir.join("release/agent-binaries/restic-manager-agent-linux-amd64"), rm_e2e::random_bytes(3, 1_200_000))
        .unwrap();
    vec!["release/SHA256SUMS".into(), "release/agent-binaries/restic-manager-agent-linux-amd64".into()]
}

fn publish_env(url: &str) -> [(&'static str, String); 3] {
    [("RELEASE_SERVER_URL", url.to_string()), ("RELEASE_REPOSITORY", "acme/rm".into()), ("RELEASE_TOKEN", TOKEN.into())]
}

fn run_publish(shell: &[&str], dir: &Path, tag: &str, files: &[String], env: &[(&str, String)]) -> Output {
    let mut a = vec![tag.to_string(), "release/notes.md".to_string()];
    a.extend(files.iter().cloned());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run_env(shell, PUBLISH_SCRIPT, &a, dir, &env)
}

/// The token appears in no output and (checked by a `curl` wrapper first on PATH) on no curl command line.
fn assert_token_kept_secret(out: &Output, context: &str) {
    assert!(
        !text(&out.stdout).contains(TOKEN) && !text(&out.stderr).contains(TOKEN),
        "{context}: token shown\n{}",
        describe(out)
    );
}

#[test]
fn publish_creates_the_release_then_attaches_each_file() {
    for (shell_name, shell) in shells() {
        let gitea = GiteaMock::start();
        let dir = tempdir();
        let files = release_dir(dir.path());
        // A curl wrapper that records its arguments, then runs the real curl.
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let real_curl = text(&Command::new("sh").args(["-c", "command -v curl"]).output().unwrap().stdout);
        let log = dir.path().join("curl-args");
        fs::write(
            bin.join("curl"),
            format!("#!/bin/sh\nprintf '%s\\n' \"$@\" >>'{}'\nexec '{}' \"$@\"\n", log.display(), real_curl.trim()),
        )
        .unwrap();
        fs::set_permissions(bin.join("curl"), fs::Permissions::from_mode(0o755)).unwrap();
        let mut env = publish_env(&gitea.url()).to_vec();
        env.push(("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap())));

        let out = run_publish(shell, dir.path(), "v1.2.3", &files, &env);
        let context = format!("{shell_name}: {}", describe(&out));
        assert_eq!(out.status.code(), Some(0), "{context}");
        assert!(out.stdout.is_empty(), "{context}");
        assert_eq!(
            gitea.calls(),
            [
                "GET /releases/tags/v1.2.3",
                "POST /releases",
                "GET /releases/7/assets",
                "POST /releases/7/assets?name=SHA256SUMS",
                "GET /releases/7/assets",
                "POST /releases/7/assets?name=restic-manager-agent-linux-amd64",
            ],
            "{context}"
        );
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!("release-publish: release 7: {}/acme/rm/releases/tag/v1.2.3", gitea.url())),
            "{context}"
        );
        assert!(
            stderr.contains("attached SHA256SUMS") && stderr.contains("attached restic-manager-agent-linux-amd64"),
            "{context}"
        );
        assert_token_kept_secret(&out, &context);
        let curl_args = fs::read_to_string(&log).unwrap();
        assert!(
            !curl_args.contains(TOKEN) && !curl_args.contains("Authorization"),
            "{shell_name}: the token is on the curl command line:\n{curl_args}"
        );

        assert!(gitea.requests().iter().all(|r| r.authorization.as_deref() == Some(&format!("token {TOKEN}")[..])));

        let state = gitea.state.lock().unwrap();
        let (_, tag, json) = &state.releases[0];
        assert_eq!(tag, "v1.2.3");
        assert_eq!(
            *json,
            serde_json::json!({
                "tag_name": "v1.2.3", "name": "restic-manager v1.2.3", "draft": false, "prerelease": false,
                "body": fs::read_to_string(dir.path().join("release/notes.md")).unwrap(),
            })
        );
        let names: Vec<&str> = state.assets.iter().map(|a| a.2.as_str()).collect();
        assert_eq!(names, ["SHA256SUMS", "restic-manager-agent-linux-amd64"]);
        for (asset, file) in state.assets.iter().zip(&files) {
            let bytes = fs::read(dir.path().join(file)).unwrap();
            assert!(asset.3.windows(bytes.len()).any(|w| w == bytes), "{shell_name}: {file} not uploaded whole");
            assert!(text(&asset.3).contains("name=\"attachment\""), "{shell_name}: not the attachment field");
        }
    }
}

/// A re-run finds the release by its tag, updates it and replaces each asset of the same name: the end state is the
/// same as after one run.
#[test]
fn publish_rerun_updates_the_release_and_replaces_assets() {
    for (shell_name, shell) in shells() {
        let gitea = GiteaMock::start();
        let dir = tempdir();
        let files = release_dir(dir.path());
        let env = publish_env(&gitea.url());
        let first = run_publish(shell, dir.path(), "refs/tags/v2.0.0-rc.1", &files, &env);
        assert_eq!(first.status.code(), Some(0), "{shell_name}: {}", describe(&first));
        fs::write(dir.path().join("release/SHA256SUMS"), "def  changed\n").unwrap();
        fs::write(dir.path().join("release/notes.md"), "second notes\n").unwrap();
        let n = gitea.requests().len();
        let again = run_publish(shell, dir.path(), "v2.0.0-rc.1", &files, &env);
        let context = format!("{shell_name}: {}", describe(&again));
        assert_eq!(again.status.code(), Some(0), "{context}");
        assert!(again.stdout.is_empty(), "{context}");
        assert_eq!(
            gitea.calls()[n..],
            [
                "GET /releases/tags/v2.0.0-rc.1",
                "PATCH /releases/7",
                "GET /releases/7/assets",
                "DELETE /releases/7/assets/8",
                "POST /releases/7/assets?name=SHA256SUMS",
                "GET /releases/7/assets",
                "DELETE /releases/7/assets/9",
                "POST /releases/7/assets?name=restic-manager-agent-linux-amd64",
            ],
            "{context}"
        );
        let state = gitea.state.lock().unwrap();
        assert_eq!(state.releases.len(), 1, "{shell_name}");
        assert_eq!(state.releases[0].2["prerelease"], true, "{shell_name}: a -rc tag is a pre-release");
        assert_eq!(state.releases[0].2["tag_name"], "v2.0.0-rc.1", "{shell_name}");
        assert_eq!(state.releases[0].2["body"], "second notes\n", "{shell_name}");
        let names: Vec<&str> = state.assets.iter().map(|a| a.2.as_str()).collect();
        assert_eq!(names, ["SHA256SUMS", "restic-manager-agent-linux-amd64"], "{shell_name}: one asset per name");
        assert!(text(&state.assets[0].3).contains("def  changed"), "{shell_name}: the new SHA256SUMS");
    }
}

/// An API failure stops the run with the method, URL, status and the answer, never the token; nothing on stdout.
#[test]
fn publish_fails_clearly_on_api_errors() {
    let echo = format!(r#"{{"message":"bad token {TOKEN}"}}"#);
    // (method, target part, status, answer, stderr part, the calls made)
    let cases: Vec<(&'static str, &'static str, u16, String, &str, usize)> = vec![
        (
            "GET",
            "/releases/tags/",
            401,
            echo.clone(),
            "GET {URL}/api/v1/repos/acme/rm/releases/tags/v1.2.3 answered 401",
            1,
        ),
        ("GET", "/releases/tags/", 500, "oops\n\u{1b}[31mred".into(), "answered 500: oops  [31mred", 1),
        ("POST", "/releases", 500, echo.clone(), "POST {URL}/api/v1/repos/acme/rm/releases answered 500", 2),
        ("POST", "/releases", 201, r#"{"id":"7; touch pwned"}"#.into(), "no release id in the answer", 2),
        ("GET", "/assets", 403, "{}".into(), "GET {URL}/api/v1/repos/acme/rm/releases/7/assets answered 403", 3),
        ("GET", "/assets", 200, "not json".into(), "not a list of assets", 3),
        (
            "POST",
            "/assets?name=restic-manager",
            413,
            "too big".into(),
            "assets?name=restic-manager-agent-linux-amd64 answered 413: too big",
            6,
        ),
    ];
    for (shell_name, shell) in shells() {
        for (method, part, status, body, says, calls) in &cases {
            let gitea = GiteaMock::start();
            gitea.state.lock().unwrap().fail = Some((method, part, *status, body.clone()));
            let dir = tempdir();
            let files = release_dir(dir.path());
            let out = run_publish(shell, dir.path(), "v1.2.3", &files, &publish_env(&gitea.url()));
            let says = says.replace("{URL}", &gitea.url());
            let context = format!("{shell_name} {method} {part} -> {status}: {}", describe(&out));
            assert_eq!(out.status.code(), Some(1), "{context}");
            assert!(out.stdout.is_empty(), "{context}");
            assert!(text(&out.stderr).contains(&says), "{context}\nwanted {says:?}");
            assert!(!out.stderr.contains(&0x1b), "{context}: raw control characters echoed");
            assert_token_kept_secret(&out, &context);
            assert_eq!(gitea.requests().len(), *calls, "{context}\n{:?}", gitea.calls());
            assert!(!dir.path().join(PWNED).exists(), "{context}");
        }
        // Nobody listening.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let dir = tempdir();
        let files = release_dir(dir.path());
        let out = run_publish(shell, dir.path(), "v1.2.3", &files, &publish_env(&closed));
        assert_eq!(out.status.code(), Some(1), "{shell_name}: {}", describe(&out));
        assert!(text(&out.stderr).contains("answered 000: curl: (7)"), "{shell_name}: {}", describe(&out));
        assert!(out.stdout.is_empty(), "{shell_name}");
    }
}

/// Refused before any request: bad tags, settings and files, hostile text included.
#[test]
fn publish_refuses_bad_input_without_calling_the_api() {
    let base = ["release/SHA256SUMS"];
    // (tag, env changes, files, exit, stderr part)
    type PublishCase<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str], i32, &'a str);
    let cases: Vec<PublishCase> = vec![
        ("main", &[], &base, 1, "is not a release tag"),
        ("v1.2.3$(touch {DIR}/pwned)", &[], &base, 1, "is not a release tag"),
        ("v1.2.3\nlatest", &[], &base, 1, "is not a release tag"),
        ("--dispatch", &[], &base, 2, "usage:"),
        ("v1.2.3", &[("RELEASE_TOKEN", "")], &base, 1, "RELEASE_TOKEN is empty"),
        ("v1.2.3", &[("RELEASE_TOKEN", "a\nb")], &base, 1, "RELEASE_TOKEN has characters"),
        ("v1.2.3", &[("RELEASE_SERVER_URL", "")], &base, 1, "RELEASE_SERVER_URL must be an http(s) URL"),
        ("v1.2.3", &[("RELEASE_SERVER_URL", "file:///etc")], &base, 1, "must be an http(s) URL"),
        ("v1.2.3", &[("RELEASE_SERVER_URL", "http://x/$(touch {DIR}/pwned)")], &base, 1, "unexpected characters"),
        ("v1.2.3", &[("RELEASE_REPOSITORY", "acme")], &base, 1, "RELEASE_REPOSITORY must be OWNER/NAME"),
        ("v1.2.3", &[("RELEASE_REPOSITORY", "acme/rm/x")], &base, 1, "must be OWNER/NAME"),
        ("v1.2.3", &[("RELEASE_REPOSITORY", "acme/r m")], &base, 1, "must be OWNER/NAME"),
        ("v1.2.3", &[], &["release/missing"], 1, "is not a readable file"),
        ("v1.2.3", &[], &["release/SHA256SUMS;type=text/html"], 1, "attachment paths are made of"),
        ("v1.2.3", &[], &["release/.hidden"], 1, "may not be empty or start with '.'"),
        ("v1.2.3", &[], &["release/"], 1, "may not be empty"),
        ("v1.2.3", &[], &[], 2, "usage:"),
    ];
    for (shell_name, shell) in shells() {
        for (tag, changes, files, code, says) in &cases {
            let gitea = GiteaMock::start();
            let dir = tempdir();
            release_dir(dir.path());
            fs::write(dir.path().join("release/.hidden"), "x").unwrap();
            let d = dir.path().to_str().unwrap();
            let mut env = publish_env(&gitea.url()).to_vec();
            for (k, v) in *changes {
                env.retain(|(key, _)| key != k);
                env.push((k, v.replace("{DIR}", d)));
            }
            let files: Vec<String> = files.iter().map(|f| f.to_string()).collect();
            let out = run_publish(shell, dir.path(), &tag.replace("{DIR}", d), &files, &env);
            let context = format!("{shell_name} {tag:?} {changes:?} {files:?}: {}", describe(&out));
            assert_eq!(out.status.code(), Some(*code), "{context}");
            assert!(out.stdout.is_empty(), "{context}");
            assert!(text(&out.stderr).contains(says), "{context}");
            assert!(gitea.requests().is_empty(), "{context}: the API was called");
            assert!(!dir.path().join(PWNED).exists(), "{context}");
            assert_token_kept_secret(&out, &context);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// release-pin.sh against a real local bare repo
// ---------------------------------------------------------------------------------------------------------------

/// origin.git (bare, main holding deploy/image-pin.env with the placeholder), `source` (a clone with the given
/// release tags: the release checkout the tags are read from) and `pin-main` (a file:// clone of main, as the
/// workflow's second checkout).
struct PinRepos {
    dir: tempfile::TempDir,
}

impl PinRepos {
    fn new(tags: &[&str]) -> PinRepos {
        let dir = tempdir();
        let p = dir.path();
        git(p, &["init", "-q", "--bare", "-b", "main", "origin.git"]);
        git(p, &["clone", "-q", "origin.git", "source"]);
        let source = p.join("source");
        fs::create_dir(source.join("deploy")).unwrap();
        fs::copy(repo_file("deploy/image-pin.env"), source.join("deploy/image-pin.env")).unwrap();
        fs::write(source.join("README"), "seed\n").unwrap();
        git(&source, &["add", "."]);
        git(&source, &["commit", "-q", "-m", "seed"]);
        git(&source, &["push", "-q", "origin", "HEAD:main"]);
        for tag in tags {
            git(&source, &["tag", tag]);
        }
        let url = format!("file://{}", p.join("origin.git").display());
        git(p, &["clone", "-q", "--depth=1", "--branch", "main", &url, "pin-main"]);
        PinRepos { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn main_log(&self) -> Vec<String> {
        git(&self.path("origin.git"), &["log", "--format=%s", "main"]).lines().map(str::to_string).collect()
    }

    fn main_pin(&self) -> String {
        git(&self.path("origin.git"), &["show", "main:deploy/image-pin.env"])
    }

    fn run(&self, shell: &[&str], tag: &str, reference: &str) -> Output {
        let mut env: Vec<(&str, &str)> = GIT_ENV[..2].to_vec();
        env.push(("RM_PIN_RETRY_DELAY", "0"));
        run_env(shell, RELEASE_PIN_SCRIPT, &args(&[tag, reference, "../pin-main"]), &self.path("source"), &env)
    }

    /// A pre-push hook in pin-main: `script` runs before each push the script makes.
    fn pre_push_hook(&self, script: &str) {
        let hook = self.path("pin-main/.git/hooks/pre-push");
        fs::write(&hook, format!("#!/bin/sh\nunset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE\n{script}")).unwrap();
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn pin_ref() -> String {
    format!("git.example.com/acme/restic-manager@sha256:{HEX}")
}

#[test]
fn pin_moves_on_the_highest_final_release_only() {
    let placeholder = format!("RM_IMAGE=git.example.com/restic-manager/restic-manager@sha256:{ZEROS}");
    // (tags in the release checkout, TAG, does the pin move, stderr part)
    let cases: &[(&[&str], &str, bool, &str)] = &[
        (&["v1.2.0", "v1.3.0"], "v1.3.0", true, "pinned git.example.com/acme/restic-manager@sha256:"),
        (&["v1.3.0"], "refs/tags/v1.3.0", true, "pinned"),
        // Numbers compare as numbers: 1.10 > 1.9.
        (&["v1.9.0", "v1.10.0"], "v1.10.0", true, "pinned"),
        (&["v1.9.0", "v1.10.0"], "v1.9.0", false, "v1.9.0 is not the highest release (v1.10.0)"),
        // A patch of an older line.
        (&["v1.2.0", "v1.3.0", "v1.2.1"], "v1.2.1", false, "v1.2.1 is not the highest release (v1.3.0)"),
        // Pre-releases never move it, nor count as the highest.
        (&["v1.3.0", "v1.4.0-rc.1"], "v1.4.0-rc.1", false, "v1.4.0-rc.1 is a pre-release"),
        (&["v1.3.0", "v2.0.0-rc.1"], "v1.3.0", true, "pinned"),
        // Tags other than vX.Y.Z do not count either.
        (&["v1.3.0", "v9.9.9.9", "v10.0.0-beta"], "v1.3.0", true, "pinned"),
    ];
    for (shell_name, shell) in shells() {
        for (tags, tag, moves, says) in cases {
            let repos = PinRepos::new(tags);
            let out = repos.run(shell, tag, &pin_ref());
            let context = format!("{shell_name} tags {tags:?}, TAG {tag}: {}", describe(&out));
            assert_eq!(out.status.code(), Some(0), "{context}");
            assert!(out.stdout.is_empty(), "{context}");
            assert!(text(&out.stderr).contains(says), "{context}");
            let short = tag.trim_start_matches("refs/tags/");
            if *moves {
                assert_eq!(
                    repos.main_log(),
                    [format!("release {short}: pin {} [skip ci]", pin_ref()), "seed".into()],
                    "{context}"
                );
                assert!(repos.main_pin().lines().any(|l| l == format!("RM_IMAGE={}", pin_ref())), "{context}");
            } else {
                assert_eq!(repos.main_log(), ["seed"], "{context}");
                assert!(repos.main_pin().contains(&placeholder), "{context}");
            }
        }
    }
}

#[test]
fn pin_rerun_with_the_same_digest_commits_nothing() {
    for (shell_name, shell) in shells() {
        let repos = PinRepos::new(&["v1.3.0"]);
        let first = repos.run(shell, "v1.3.0", &pin_ref());
        assert_eq!(first.status.code(), Some(0), "{shell_name}: {}", describe(&first));
        let again = repos.run(shell, "v1.3.0", &pin_ref());
        assert_eq!(again.status.code(), Some(0), "{shell_name}: {}", describe(&again));
        assert!(text(&again.stderr).contains("already pins"), "{shell_name}: {}", describe(&again));
        assert_eq!(repos.main_log().len(), 2, "{shell_name}: {:?}", repos.main_log());
    }
}

/// Someone pushes to main between the script's fetch and its push: the push is rejected, and the second try
/// rebuilds the pin commit on top of that commit.
#[test]
fn pin_retries_on_top_of_a_concurrent_commit() {
    for (shell_name, shell) in shells() {
        let repos = PinRepos::new(&["v1.3.0"]);
        let origin = repos.path("origin.git");
        let other = repos.path("other");
        let marker = repos.path("raced");
        // The first push only: another clone commits to main and pushes first.
        repos.pre_push_hook(&format!(
            "[ -e '{m}' ] && exit 0\n: >'{m}'\nexport GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1\n\
             git clone -q '{o}' '{w}' && cd '{w}' && echo racer >concurrent.txt && git add concurrent.txt &&\n\
             git -c user.name=racer -c user.email=r@example.invalid commit -q -m concurrent && git push -q origin HEAD:main\n",
            m = marker.display(),
            o = origin.display(),
            w = other.display()
        ));
        let out = repos.run(shell, "v1.3.0", &pin_ref());
        let context = format!("{shell_name}: {}", describe(&out));
        assert_eq!(out.status.code(), Some(0), "{context}");
        assert!(out.stdout.is_empty(), "{context}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains("pushing the pin failed (try 1 of 3)"), "{context}");
        assert!(!stderr.contains("try 2 of 3"), "{context}");
        assert_eq!(
            repos.main_log(),
            [format!("release v1.3.0: pin {} [skip ci]", pin_ref()), "concurrent".into(), "seed".into()],
            "{context}"
        );
        assert_eq!(git(&origin, &["show", "main:concurrent.txt"]), "racer", "{context}");
        assert!(repos.main_pin().contains(&format!("RM_IMAGE={}", pin_ref())), "{context}");
        // The pin commit changes the one file.
        assert_eq!(git(&origin, &["show", "--format=", "--name-only", "main"]), "deploy/image-pin.env", "{context}");
    }
}

#[test]
fn pin_gives_up_after_three_rejected_pushes() {
    for (shell_name, shell) in shells() {
        let repos = PinRepos::new(&["v1.3.0"]);
        let count = repos.path("pushes");
        repos.pre_push_hook(&format!("echo x >>'{}'\nexit 1\n", count.display()));
        let out = repos.run(shell, "v1.3.0", &pin_ref());
        let context = format!("{shell_name}: {}", describe(&out));
        assert_eq!(out.status.code(), Some(1), "{context}");
        assert!(out.stdout.is_empty(), "{context}");
        let stderr = text(&out.stderr);
        for n in 1..=3 {
            assert!(stderr.contains(&format!("try {n} of 3")), "{context}");
        }
        assert!(stderr.contains("release-pin: could not push the pin to main after 3 tries"), "{context}");
        assert_eq!(fs::read_to_string(&count).unwrap().lines().count(), 3, "{context}");
        assert_eq!(repos.main_log(), ["seed"], "{context}");
    }
}

#[test]
fn pin_refuses_bad_input_and_leaves_main_alone() {
    // (TAG, REF, exit, stderr part)
    let cases: Vec<(String, String, i32, &str)> = vec![
        ("v1.3.0$(touch {DIR}/pwned)".into(), pin_ref(), 1, "is not a release tag"),
        ("v1.3.0\nv9.9.9".into(), pin_ref(), 1, "is not a release tag"),
        ("main".into(), pin_ref(), 1, "is not a release tag"),
        ("v1.3.0".into(), "git.example.com/acme/restic-manager:v1.3.0".into(), 1, "pinned by tag"),
        ("v1.3.0".into(), "x@sha256:$(touch {DIR}/pwned)".into(), 1, "contains '$' or a backtick"),
        ("v1.3.0".into(), format!("x@sha256:{HEX}\nRM_IMAGE=evil"), 1, "characters no image reference has"),
        ("--help".into(), pin_ref(), 2, "usage:"),
        ("v1.3.0".into(), String::new(), 2, "usage:"),
    ];
    for (shell_name, shell) in shells() {
        for (tag, reference, code, says) in &cases {
            let repos = PinRepos::new(&["v1.3.0"]);
            let d = repos.dir.path().to_str().unwrap();
            let out = repos.run(shell, &tag.replace("{DIR}", d), &reference.replace("{DIR}", d));
            let context = format!("{shell_name} {tag:?} {reference:?}: {}", describe(&out));
            assert_eq!(out.status.code(), Some(*code), "{context}");
            assert!(out.stdout.is_empty(), "{context}");
            assert!(text(&out.stderr).contains(says), "{context}");
            assert_eq!(repos.main_log(), ["seed"], "{context}");
            assert!(!repos.path(PWNED).exists() && !repos.path("source").join(PWNED).exists(), "{context}");
        }
        let repos = PinRepos::new(&["v1.3.0"]);
        let out = run_env(shell, RELEASE_PIN_SCRIPT, &args(&["v1.3.0", &pin_ref()]), &repos.path("source"), &[]);
        assert_eq!(out.status.code(), Some(2), "{shell_name}: {}", describe(&out));
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

/// Syntax only (`sh -n`) under every shell; shellcheck runs once over scripts/*.sh in `make lint`.
#[test]
fn posix_shells_parse_every_script() {
    for script in ALL_SCRIPTS {
        let path = repo_file(script);
        for (name, shell) in shells() {
            let mut cmd = Command::new(shell[0]);
            cmd.args(&shell[1..]).arg("-n").arg(&path);
            let out = run_bounded(cmd, TIMEOUT);
            assert!(out.status.success(), "{name} -n {script}: {}", describe(&out));
        }
    }
}

/// The workflow's `run:` steps call the scripts and keep no logic of their own that these tests would miss.
#[test]
fn workflow_calls_the_scripts() {
    let workflow = fs::read_to_string(repo_file(".gitea/workflows/release.yml")).unwrap();
    for call in [
        "run: scripts/release-meta.sh --github",
        "scripts/release-publish.sh \"$TAG\" release/notes.md release/SHA256SUMS",
        "run: scripts/release-pin.sh \"$TAG\" \"$REL_IMAGE@$REL_DIGEST\" pin-main",
    ] {
        assert!(workflow.contains(call), "release.yml no longer contains {call:?}");
    }
    for gone in ["curl ", "git push", "tr '[:upper:]' '[:lower:]'", "/api/v1/"] {
        assert!(!workflow.contains(gone), "release.yml has inline logic again: {gone:?}");
    }
    for script in ALL_SCRIPTS {
        let path = repo_file(script);
        assert!(mode(&path) & 0o111 != 0, "{script} is not executable");
        assert!(path.to_str().unwrap().ends_with(".sh"), "{script}: `make lint` shellchecks scripts/*.sh only");
    }
}
