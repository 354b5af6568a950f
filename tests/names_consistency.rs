//! One list of agent file names: the Rust platform table, `scripts/dist.sh`, `scripts/release-sums.sh`,
//! `scripts/install.sh`, `scripts/install.ps1` and `.gitea/workflows/release.yml` must all name exactly the agents
//! in `EXPECTED`, and no Rust source of the agent or the server may spell an agent name outside it (a typo such as
//! `restic-manager-agent-linux-x86_64` or a Windows name without `.exe`).
//!
//! Nothing here links to the crates: every file is read as text, so the test keeps working while the platform table
//! moves between crates (repoint `RUST_TABLE`). No regex crate either: a name is `restic-manager-agent-` followed
//! by the characters `[A-Za-z0-9_.-]`, a trailing `.` (end of a sentence) dropped.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The Rust source holding `PLATFORMS` and `Platform::file_name()`. The one place to change when the table moves.
const RUST_TABLE: &str = "internal/protocol/src/platform.rs";

/// Every agent that is built, shipped and served.
const EXPECTED: [&str; 3] =
    ["restic-manager-agent-linux-amd64", "restic-manager-agent-linux-arm64", "restic-manager-agent-windows-amd64.exe"];

const PREFIX: &str = "restic-manager-agent-";

/// The first part of a name after the prefix that makes it a platform name (anything else, e.g. the agent's
/// `.restic-manager-agent-update-` temp files, is another kind of name).
const OS_WORDS: [&str; 12] =
    ["linux", "windows", "win", "win32", "win64", "darwin", "macos", "mac", "freebsd", "openbsd", "netbsd", "android"];

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").join(rel)
}

fn read(rel: &str) -> String {
    fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn set<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    names.into_iter().map(str::to_string).collect()
}

fn expected_for(os: &str) -> BTreeSet<String> {
    set(EXPECTED.iter().copied().filter(|n| n.starts_with(&format!("{PREFIX}{os}-"))))
}

/// Every `restic-manager-agent-<tail>` spelled in `text`, with its line number. `restic-manager-agent-{a,b}` counts
/// as the names `restic-manager-agent-a` and `restic-manager-agent-b` (dist.sh's header uses that shell notation).
fn spellings(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices(PREFIX) {
        let line = text[..at].matches('\n').count() + 1;
        let rest = &text[at + PREFIX.len()..];
        if let Some(braced) = rest.strip_prefix('{') {
            let inner = &braced[..braced.find('}').unwrap_or(0)];
            found.extend(inner.split(',').map(|part| (line, format!("{PREFIX}{part}"))));
            continue;
        }
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || "_.-".contains(c))).unwrap_or(rest.len());
        let tail = rest[..end].trim_end_matches('.');
        found.push((line, format!("{PREFIX}{tail}")));
    }
    found
}

/// The spellings that are platform names (the part after the prefix starts with an OS word).
fn platform_names(text: &str) -> Vec<(usize, String)> {
    spellings(text)
        .into_iter()
        .filter(|(_, name)| {
            let first = name[PREFIX.len()..].split(['-', '_', '.']).next().unwrap_or("");
            OS_WORDS.contains(&first.to_ascii_lowercase().as_str())
        })
        .collect()
}

/// The names the Rust table ships: the `file_name()` match arm of each `(Os, Arch)` pair listed in `PLATFORMS`.
/// A plain scan of the file would also find `restic-manager-agent-windows-arm64.exe`: `file_name()` names every
/// `Os` x `Arch` pair, including the one no agent is built for, so the table is read instead of the bare strings.
/// Returns (shipped names, names of the arms for pairs outside `PLATFORMS`).
fn rust_table(src: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let start = src.find("pub const PLATFORMS").unwrap_or_else(|| panic!("{RUST_TABLE}: no `pub const PLATFORMS`"));
    let table = &src[start..start + src[start..].find("];").expect("PLATFORMS ends with `];`")];
    let pairs: Vec<(String, String)> = table
        .lines()
        .filter_map(|l| {
            let os = l.split("Os::").nth(1)?.split(|c: char| !c.is_alphanumeric()).next()?;
            let arch = l.split("Arch::").nth(1)?.split(|c: char| !c.is_alphanumeric()).next()?;
            Some((os.to_string(), arch.to_string()))
        })
        .collect();
    assert!(!pairs.is_empty(), "{RUST_TABLE}: no Platform {{ os: Os::.., arch: Arch::.. }} entries in PLATFORMS");
    let (mut shipped, mut others) = (BTreeSet::new(), BTreeSet::new());
    let mut arms = 0;
    for l in src.lines() {
        // (Os::Linux, Arch::Amd64) => "restic-manager-agent-linux-amd64",
        let Some((pattern, value)) = l.split_once("=>") else { continue };
        let (Some(os), Some(arch)) = (pattern.split("Os::").nth(1), pattern.split("Arch::").nth(1)) else { continue };
        let Some(name) = value.split('"').nth(1).filter(|n| n.starts_with(PREFIX)) else { continue };
        let key = (
            os.split(|c: char| !c.is_alphanumeric()).next().unwrap_or("").to_string(),
            arch.split(|c: char| !c.is_alphanumeric()).next().unwrap_or("").to_string(),
        );
        arms += 1;
        if pairs.contains(&key) {
            shipped.insert(name.to_string())
        } else {
            others.insert(name.to_string())
        };
    }
    assert!(arms >= pairs.len(), "{RUST_TABLE}: found {arms} file_name() arms for {} PLATFORMS entries", pairs.len());
    (shipped, others)
}

/// install.sh builds the name from parts, `restic-manager-agent-$os-$arch`: the parts are the values
/// `detect_platform` assigns to `os` and `arch`, and the names are every combination.
fn install_sh_names(src: &str) -> Result<BTreeSet<String>, String> {
    if !src.contains("file=\"restic-manager-agent-$os-$arch\"") {
        return Err("no longer builds the name as file=\"restic-manager-agent-$os-$arch\"; update this test".into());
    }
    let start = src.find("detect_platform() {").ok_or("no detect_platform() function")?;
    let body = &src[start..start + src[start..].find("\n}").ok_or("detect_platform() has no end")?];
    let values = |var: &str| -> BTreeSet<String> {
        body.match_indices(&format!("{var}="))
            .filter(|(i, _)| !body[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
            .map(|(i, m)| {
                let v = &body[i + m.len()..];
                v[..v.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(v.len())].to_string()
            })
            .filter(|v| !v.is_empty())
            .collect()
    };
    let (oses, arches) = (values("os"), values("arch"));
    Ok(oses.iter().flat_map(|os| arches.iter().map(move |arch| format!("{PREFIX}{os}-{arch}"))).collect())
}

/// The Rust sources of the agent and the server.
fn rust_sources() -> Vec<String> {
    fn walk(dir: &Path, root: &Path, recursive: bool, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() && recursive {
                walk(&path, root, recursive, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let root = repo_file("");
    let mut files = Vec::new();
    walk(&root.join("internal/agent/src"), &root, false, &mut files);
    walk(&root.join("internal/protocol/src"), &root, true, &mut files);
    walk(&root.join("internal/server/src"), &root, true, &mut files);
    files.sort();
    files
}

#[test]
fn agent_file_names_agree_everywhere() {
    let expected = set(EXPECTED);
    let mut problems = Vec::new();
    let mut compare = |file: &str, what: &str, got: &BTreeSet<String>, want: &BTreeSet<String>| {
        if got != want {
            problems.push(format!(
                "{file}: {what} are {got:?}, expected {want:?}\n  missing: {:?}\n  extra:   {:?}",
                want.difference(got).collect::<Vec<_>>(),
                got.difference(want).collect::<Vec<_>>()
            ));
        }
    };

    // The Rust table.
    let table_src = read(RUST_TABLE);
    let (shipped, unbuilt) = rust_table(&table_src);
    compare(RUST_TABLE, "the names of PLATFORMS", &shipped, &expected);
    let allowed_in_table: BTreeSet<String> = expected.union(&unbuilt).cloned().collect();

    // Files that list every agent.
    for file in ["scripts/dist.sh", "scripts/release-sums.sh", ".gitea/workflows/release.yml"] {
        let got = platform_names(&read(file)).into_iter().map(|(_, n)| n).collect();
        compare(file, "the agent names", &got, &expected);
    }
    // The installers handle one OS each: install.ps1 Windows (amd64 only: it refuses other architectures),
    // install.sh Linux.
    let got = platform_names(&read("scripts/install.ps1")).into_iter().map(|(_, n)| n).collect();
    compare("scripts/install.ps1", "the agent names", &got, &expected_for("windows"));
    let install_sh = read("scripts/install.sh");
    match install_sh_names(&install_sh) {
        Ok(got) => compare("scripts/install.sh", "the names detect_platform can build", &got, &expected_for("linux")),
        Err(why) => problems.push(format!("scripts/install.sh: {why}")),
    }

    // No other spelling anywhere: every platform name in these files is one of EXPECTED.
    let mut files: Vec<String> =
        ["scripts/dist.sh", "scripts/release-sums.sh", "scripts/install.sh", "scripts/install.ps1"]
            .into_iter()
            .chain([".gitea/workflows/release.yml", RUST_TABLE])
            .map(str::to_string)
            .collect();
    files.extend(rust_sources());
    let mut scanned = 0;
    for file in &files {
        let allowed = if file == RUST_TABLE { &allowed_in_table } else { &expected };
        for (line, name) in platform_names(&read(file)) {
            if !allowed.contains(&name) {
                problems.push(format!("{file}:{line}: {name:?} is not one of {EXPECTED:?}"));
            }
        }
        scanned += 1;
    }
    assert!(scanned > 10, "only {scanned} files scanned: the agent/server sources were not found");
    assert!(
        problems.is_empty(),
        "the agent file names disagree ({} problems):\n\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}

/// The scanner itself: names, braces, sentence ends, other names.
#[test]
fn spellings_are_found_as_written() {
    let text = "a restic-manager-agent-linux-amd64.\n`restic-manager-agent-{linux-arm64,windows-amd64.exe}`\n\
                .restic-manager-agent-update- \"restic-manager-agent-linux-x86_64\" restic-manager-agent-$os-$arch";
    let names: Vec<(usize, String)> = platform_names(text);
    let names: Vec<(usize, &str)> = names.iter().map(|(l, n)| (*l, n.as_str())).collect();
    assert_eq!(
        names,
        [
            (1, "restic-manager-agent-linux-amd64"),
            (2, "restic-manager-agent-linux-arm64"),
            (2, "restic-manager-agent-windows-amd64.exe"),
            (3, "restic-manager-agent-linux-x86_64"),
        ]
    );
    let sh = "detect_platform() {\n  case x in Linux) os=linux ;; esac\n  case y in\n    a) arch=amd64 ;;\n    b) arch=arm64 ;;\n  esac\n  file=\"restic-manager-agent-$os-$arch\"\n}\n";
    assert_eq!(install_sh_names(sh).unwrap(), expected_for("linux"));
}
