//! Build facts for `datapunk-lb --version`: the git commit and the enabled
//! cargo features, as `DATAPUNK_LB_GIT_COMMIT` and `DATAPUNK_LB_FEATURES`
//! (read with `env!` in `src/cli.rs`).
//!
//! ## Never fails the build
//!
//! The commit is `git rev-parse --short HEAD` run in this crate's directory;
//! with no `git` or no repository (a crates.io or tarball build) it is
//! `unknown`, unless `DATAPUNK_LB_GIT_COMMIT` is set in the environment
//! (packagers who know the commit). Nothing here can fail the build.
//!
//! ## Rebuilt when the commit changes, and only then
//!
//! Cargo reruns this script when one of the files named by
//! `rerun-if-changed` changes: `HEAD` in the git directory (a checkout or
//! branch switch), the ref it points to (a commit on the branch) and
//! `packed-refs` (where `git gc` moves refs). A worktree has its own `HEAD`
//! but shares refs with the main repository (`--git-common-dir`). Only files
//! that exist are named: a missing one would make Cargo rerun the script,
//! and rebuild the crate, on every build.

// A build script talks to Cargo on stdout.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DATAPUNK_LB_GIT_COMMIT");
    let commit = match std::env::var("DATAPUNK_LB_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_owned(),
        _ => git_commit().unwrap_or_else(|| "unknown".to_owned()),
    };
    println!("cargo:rustc-env=DATAPUNK_LB_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=DATAPUNK_LB_FEATURES={}", features());
}

/// Runs `git args` here; its trimmed stdout if it succeeded.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

/// The short commit, after naming the files that change with it.
fn git_commit() -> Option<String> {
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    // Relative paths from rev-parse are relative to the current directory,
    // which Cargo sets to the manifest's.
    let absolute = |p: String| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            here.join(p)
        }
    };
    let git_dir = absolute(git(&["rev-parse", "--git-dir"])?);
    let common_dir = git(&["rev-parse", "--git-common-dir"]).map_or(git_dir.clone(), absolute);
    let mut watched = vec![git_dir.join("HEAD"), common_dir.join("packed-refs")];
    // `HEAD` when detached; else e.g. `refs/heads/main`.
    if let Some(r) = git(&["rev-parse", "--symbolic-full-name", "HEAD"]) {
        if r.starts_with("refs/") {
            watched.push(common_dir.join(r));
        }
    }
    for f in watched.iter().filter(|f| Path::exists(f)) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    git(&["rev-parse", "--short", "HEAD"])
}

/// The enabled features (Cargo sets `CARGO_FEATURE_<NAME>` for each),
/// comma-separated, without `default`; `none` when there are none.
fn features() -> String {
    let mut names: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| {
            k.strip_prefix("CARGO_FEATURE_")
                .map(|n| n.to_lowercase().replace('_', "-"))
        })
        .filter(|n| n != "default")
        .collect();
    names.sort();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(",")
    }
}
