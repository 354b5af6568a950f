//! Resolves version, commit and date once per build.
//!
//! Order for each value: the build environment (`VERSION`, `COMMIT`, `DATE`, as a Docker build passes them; an empty
//! value counts as unset), then git, then the fixed fallbacks `dev` / `none` / `unknown`.

use std::path::Path;
use std::process::Command;

fn main() {
    for var in ["VERSION", "COMMIT", "DATE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).current_dir(&manifest_dir).env("TZ", "UTC").output().ok()?;
        if !out.status.success() {
            return None;
        }
        clean(&String::from_utf8_lossy(&out.stdout))
    };

    // Rebuild when HEAD moves (a commit, a checkout) so the embedded commit stays true.
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let git_dir = Path::new(&git_dir);
        println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
        println!("cargo:rerun-if-changed={}", git_dir.join("packed-refs").display());
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={}", git_dir.join(head_ref).display());
        }
    }

    let version = from_env("VERSION")
        .or_else(|| git(&["describe", "--tags", "--match", "v[0-9]*"]).map(|v| v.trim_start_matches('v').to_string()))
        .unwrap_or_else(|| "dev".to_string());
    let commit = from_env("COMMIT").or_else(|| git(&["rev-parse", "HEAD"])).unwrap_or_else(|| "none".to_string());
    let date = from_env("DATE")
        .or_else(|| git(&["log", "-1", "--format=%cd", "--date=format-local:%Y-%m-%dT%H:%M:%SZ"]))
        .unwrap_or_else(|| "unknown".to_string());

    println!("cargo:rustc-env=RM_BUILD_VERSION={version}");
    println!("cargo:rustc-env=RM_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=RM_BUILD_DATE={date}");
}

fn from_env(name: &str) -> Option<String> {
    std::env::var(name).ok().and_then(|v| clean(&v))
}

/// One trimmed line of printable ASCII without the marker's separator, or nothing.
fn clean(raw: &str) -> Option<String> {
    let value = raw.trim();
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b'=');
    if !ok && !value.is_empty() {
        println!("cargo:warning=ignoring unusable build value {value:?}");
    }
    ok.then(|| value.to_string())
}
