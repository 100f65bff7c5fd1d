//! `cargo xtask <command>`: project chores that are more than one cargo call.
//!
//! - `ci`: what CI runs (`.ci/run`): formatting, lints, and the test suite with the shared
//!   assets required.
//! - `reproduce <name|all>`: runs `pipelines/<name>.yaml` with the release binary into
//!   `runs/<name>` and prints where the report is.
//! - `demo`: `vulnmap demo` with the release binary.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("reproduce") => reproduce(args.get(1).map(String::as_str), &args[args.len().min(2)..]),
        Some("demo") => vulnmap(&["demo", "--out", "runs/demo"]),
        Some(other) => bail!("unknown xtask `{other}`\n\n{USAGE}"),
        None => {
            println!("{USAGE}");
            Ok(())
        }
    }
}

const USAGE: &str = "usage: cargo xtask <command>

commands:
  reproduce <name|all> [--device D]
        run pipelines/<name>.yaml (or every one) into runs/<name>; prints the report's path
  demo  the offline demo (synthetic fundus data, every method, a report) into runs/demo
  ci    formatting, clippy with warnings as errors, and the workspace tests
        (VULNMAP_REQUIRE_ASSETS=1, so missing shared assets fail instead of skipping)";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root())
        .env("VULNMAP_REQUIRE_ASSETS", "1")
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["test", "--workspace"])
}

/// Runs the release `vulnmap` binary (building it first) with `args`.
fn vulnmap(args: &[&str]) -> Result<()> {
    cargo(&["build", "--release", "-p", "vulnmap"])?;
    let binary = root().join("target").join("release").join("vulnmap");
    let status = Command::new(&binary)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("running {}", binary.display()))?;
    if !status.success() {
        bail!("vulnmap {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn pipelines() -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("pipelines"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            let stem = p.file_stem()?.to_string_lossy().into_owned();
            (p.extension()? == "yaml").then_some(stem)
        })
        .collect();
    names.sort();
    Ok(names)
}

fn reproduce(name: Option<&str>, extra: &[String]) -> Result<()> {
    let known = pipelines()?;
    let chosen: Vec<String> = match name {
        None => bail!("which pipeline? one of: all, {}", known.join(", ")),
        Some("all") => known.into_iter().filter(|n| n != "demo").collect(),
        Some(n) if known.iter().any(|k| k == n) => vec![n.to_string()],
        Some(n) => bail!("no pipelines/{n}.yaml; known: all, {}", known.join(", ")),
    };
    for name in chosen {
        let file = format!("pipelines/{name}.yaml");
        let out = format!("runs/{name}");
        let mut args = vec!["run", file.as_str(), "--out", out.as_str(), "--resume"];
        args.extend(extra.iter().map(String::as_str));
        vulnmap(&args)?;
    }
    Ok(())
}
