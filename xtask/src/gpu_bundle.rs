//! `cargo xtask gpu-bundle [--cudnn]`: builds the CUDA binaries here and packs them for the GPU
//! machine, which has no Rust and takes at most 64 MiB of carried files per command.
//!
//! Builds (in `target/cuda`, with the toolkit `../shared/docs/CUDA.md` describes already in the
//! environment) the release `vulnmap-bench` and `vulnmap`, and every test binary of the
//! workspace with `vulnmap-models/cuda`. Each is stripped and xz-compressed into `.gpu/<part>/`
//! under its path from the repository root: part `bench` holds the two release binaries, parts
//! `tests-1`, `tests-2`, ... the test binaries, a package's together (the CLI's tests with the
//! `vulnmap` binary they run), each part under [`PART_LIMIT`]. `.gpu/manifest.txt` lists what is
//! where, `.gpu/root` the folder the binaries were built in, and `.gpu/run.sh` runs a part there.

use crate::root;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What one carry may hold (64 MiB), less room for the script and manifest.
const PART_LIMIT: u64 = 60 << 20;

/// A built executable to pack: a test binary, or a binary tests run.
struct Built {
    path: PathBuf,
    /// The package's folder from the repository root (where cargo runs its tests).
    package: String,
    test: bool,
}

pub(crate) fn gpu_bundle(args: &[String]) -> Result<()> {
    let feature = match args {
        [] => "cuda",
        [flag] if flag == "--cudnn" => "cudnn",
        _ => bail!("usage: cargo xtask gpu-bundle [--cudnn]"),
    };
    let nvcc = Command::new("nvcc").arg("--version").output();
    ensure!(
        nvcc.is_ok_and(|o| o.status.success()),
        "nvcc not found: put the CUDA toolkit in the environment first (CUDA_HOME, PATH, \
         LIBRARY_PATH, CUDA_COMPUTE_CAP; ../shared/docs/CUDA.md)"
    );
    let root = root();
    let target = root.join("target/cuda");
    let mut built = Vec::new();
    for package in ["vulnmap-bench", "vulnmap"] {
        let args = ["build", "--release", "-p", package, "--features", feature];
        built.extend(cargo_artifacts(&target, &args)?);
    }
    built.retain(|b| b.path.starts_with(target.join("release")));
    let models_feature = format!("vulnmap-models/{feature}");
    let test_args = [
        "test",
        "--workspace",
        "--no-run",
        "--features",
        &models_feature,
    ];
    built.extend(cargo_artifacts(&target, &test_args)?);

    let bundle = root.join(".gpu");
    if bundle.exists() {
        std::fs::remove_dir_all(&bundle)
            .with_context(|| format!("clearing {}", bundle.display()))?;
    }
    // The release binaries first (part `bench`), then the tests a package at a time.
    built.sort_by_key(|b| {
        (
            !b.path.starts_with(target.join("release")),
            b.package.clone(),
        )
    });
    let packed = built
        .iter()
        .map(|b| pack(&b.path))
        .collect::<Result<Vec<_>>>()?;
    let parts = assign_parts(&built, &packed, &target.join("release"));
    let mut manifest = String::new();
    for ((b, packed), name) in built.iter().zip(&packed).zip(&parts) {
        let relative = b.path.strip_prefix(&root)?;
        let dest = bundle.join(name).join(format!("{}.xz", relative.display()));
        std::fs::create_dir_all(dest.parent().expect("a file in a folder"))?;
        std::fs::write(&dest, packed).with_context(|| format!("writing {}", dest.display()))?;
        let kind = if b.test { "test" } else { "file" };
        manifest.push_str(&format!(
            "{kind} {name} {} {}\n",
            relative.display(),
            b.package
        ));
        eprintln!(
            "{name}: {} ({:.1} MiB packed)",
            relative.display(),
            packed.len() as f64 / (1 << 20) as f64
        );
    }
    std::fs::write(bundle.join("manifest.txt"), manifest)?;
    std::fs::write(bundle.join("root"), root.display().to_string())?;
    std::fs::write(bundle.join("run.sh"), include_str!("gpu_run.sh"))?;
    for entry in std::fs::read_dir(&bundle)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            let bytes = folder_bytes(&entry.path())?;
            ensure!(
                bytes <= PART_LIMIT,
                "{} is {bytes} bytes, over what one carry takes",
                entry.path().display()
            );
        }
    }
    let test_parts = parts
        .iter()
        .filter_map(|p| p.strip_prefix("tests-")?.parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    println!(
        "packed .gpu/: bench and tests-1..tests-{test_parts}. On the GPU machine, one device call per part:\n  \
         carry [\".gpu/run.sh\", \".gpu/manifest.txt\", \".gpu/root\", \".gpu/tests-1\"], \
         command `bash .gpu/run.sh tests tests-1`\n  \
         carry the same with \".gpu/bench\", command `bash .gpu/run.sh bench`, then here \
         `cargo xtask bench --from <fetched folder>`"
    );
    Ok(())
}

/// The part of each built file: `bench` for the release binaries, `tests-N` for the others, a
/// package's files together unless they alone overflow a part, each part under [`PART_LIMIT`].
fn assign_parts(built: &[Built], packed: &[Vec<u8>], release: &Path) -> Vec<String> {
    let package_bytes = |package: &str| -> u64 {
        built
            .iter()
            .zip(packed)
            .filter(|(b, _)| b.package == package && !b.path.starts_with(release))
            .map(|(_, p)| p.len() as u64)
            .sum()
    };
    let (mut part, mut used) = (0usize, PART_LIMIT);
    let mut last_package = "";
    let mut names = Vec::with_capacity(built.len());
    for (b, p) in built.iter().zip(packed) {
        if b.path.starts_with(release) {
            names.push("bench".to_string());
            continue;
        }
        let size = p.len() as u64;
        let whole = package_bytes(&b.package);
        let first_of_package = b.package != last_package;
        let package_overflows =
            first_of_package && whole <= PART_LIMIT && used + whole > PART_LIMIT;
        if package_overflows || used + size > PART_LIMIT {
            part += 1;
            used = 0;
        }
        last_package = &b.package;
        used += size;
        names.push(format!("tests-{part}"));
    }
    names
}

/// Runs cargo with `--message-format=json` into `target` and returns the executables it built
/// from workspace packages.
fn cargo_artifacts(target: &Path, args: &[&str]) -> Result<Vec<Built>> {
    let root = root();
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .env("CARGO_TARGET_DIR", target)
        .current_dir(&root)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !output.status.success() {
        bail!("cargo {} failed ({})", args.join(" "), output.status);
    }
    let mut built = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some("compiler-artifact"), Some(executable)) =
            (message["reason"].as_str(), message["executable"].as_str())
        else {
            continue;
        };
        let kinds = message["target"]["kind"].as_array();
        if kinds.is_some_and(|k| k.iter().any(|k| k == "custom-build")) {
            continue;
        }
        let manifest = PathBuf::from(message["manifest_path"].as_str().unwrap_or_default());
        let Ok(package) = manifest.parent().unwrap_or(&root).strip_prefix(&root) else {
            continue; // not a workspace package
        };
        built.push(Built {
            path: PathBuf::from(executable),
            package: package.display().to_string(),
            test: message["profile"]["test"].as_bool() == Some(true),
        });
    }
    Ok(built)
}

/// The file stripped of its symbols and xz-compressed.
fn pack(path: &Path) -> Result<Vec<u8>> {
    let stripped = path.with_extension("stripped");
    run(Command::new("strip").arg("-o").arg(&stripped).arg(path))?;
    let output = Command::new("xz")
        .args(["-T0", "-6", "-c"])
        .arg(&stripped)
        .output()
        .context("running xz")?;
    std::fs::remove_file(&stripped)?;
    ensure!(
        output.status.success(),
        "xz failed on {}",
        stripped.display()
    );
    Ok(output.stdout)
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(status.success(), "{command:?} failed ({status})");
    Ok(())
}

fn folder_bytes(folder: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(folder)? {
        let entry = entry?;
        total += if entry.file_type()?.is_dir() {
            folder_bytes(&entry.path())?
        } else {
            entry.metadata()?.len()
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(path: &str, package: &str) -> Built {
        Built {
            path: PathBuf::from(path),
            package: package.into(),
            test: true,
        }
    }

    #[test]
    fn parts_stay_under_the_limit_and_keep_small_packages_whole() {
        let mib = |n: u64| vec![0u8; (n << 20) as usize];
        let release = Path::new("/r/target/cuda/release");
        let files = [
            (
                built("/r/target/cuda/release/vulnmap", "crates/cli"),
                mib(8),
            ),
            (built("/r/target/cuda/debug/a1", "a"), mib(25)),
            (built("/r/target/cuda/debug/a2", "a"), mib(25)),
            // b (20 MiB) fits nowhere beside a's 50: a new part, whole.
            (built("/r/target/cuda/debug/b1", "b"), mib(10)),
            (built("/r/target/cuda/debug/b2", "b"), mib(10)),
            // c (90 MiB) cannot be whole: it fills parts file by file (c1 beside b).
            (built("/r/target/cuda/debug/c1", "c"), mib(30)),
            (built("/r/target/cuda/debug/c2", "c"), mib(30)),
            (built("/r/target/cuda/debug/c3", "c"), mib(30)),
        ];
        let (built, packed): (Vec<_>, Vec<_>) = files.into_iter().unzip();
        let parts = assign_parts(&built, &packed, release);
        let expected = [
            "bench", "tests-1", "tests-1", "tests-2", "tests-2", "tests-2", "tests-3", "tests-3",
        ];
        assert_eq!(parts, expected);
        for part in &parts {
            let bytes: u64 = parts
                .iter()
                .zip(&packed)
                .filter(|(p, _)| *p == part)
                .map(|(_, b)| b.len() as u64)
                .sum();
            assert!(part == "bench" || bytes <= PART_LIMIT, "{part}: {bytes}");
        }
    }
}
