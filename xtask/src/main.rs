//! `cargo xtask <command>`: project chores that are more than one cargo call.
//!
//! - `ci`: what CI runs (`.ci/run`): `lint`, then the test suite with the shared assets
//!   required.
//! - `lint`: formatting, and clippy with warnings as errors over the workspace lints.
//! - `reproduce <name|all>`: runs `pipelines/<name>.yaml` with the release binary into
//!   `runs/<name>` and prints where the report is.
//! - `demo`: `vulnmap demo` with the release binary.
//! - `bench [--quick] [--only NAME] [--device D] [--no-torch] [--from DIR]`: vulnmap-bench in
//!   release mode, and the same measurements in PyTorch (`bench/torch_reference.py`, which also
//!   exports the ONNX rows' models) when a Python with torch is found; prints a Markdown table with the ratios and writes `target/bench/bench.json`.
//!   `--from` tabulates `vulnmap.json` and `torch.json` measured elsewhere (the GPU machine).
//! - `gpu-bundle [--cudnn]`: the CUDA binaries and test binaries, packed for the GPU machine
//!   ([`gpu_bundle`]).

mod gpu_bundle;
#[cfg(test)]
mod tidy;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("lint") => lint(),
        Some("reproduce") => reproduce(args.get(1).map(String::as_str), &args[args.len().min(2)..]),
        Some("bench") => bench(&args[1..]),
        Some("demo") => vulnmap(&["demo", "--out", "runs/demo"]),
        Some("gpu-bundle") => gpu_bundle::gpu_bundle(&args[1..]),
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
  bench [--quick] [--only NAME] [--device cpu|cuda] [--no-torch] [--from DIR]
        ResNet50 forward, input gradient, SmoothGrad, attack iteration and local map, and the
        forward + input gradient of ONNX exports (ResNet50, six torchvision families), against
        PyTorch (a Python with torch: $VULNMAP_TORCH_PYTHON, target/bench/venv, or python3;
        else a venv is made there with pip); table on stdout, JSON in target/bench/
        --from DIR: tabulate DIR/vulnmap.json and DIR/torch.json measured elsewhere
  demo  the offline demo (synthetic fundus data, every method, a report) into runs/demo
  gpu-bundle [--cudnn]
        build the CUDA bench, CLI and test binaries (toolkit per ../shared/docs/CUDA.md) and
        pack them into .gpu/ parts of at most 60 MiB for the GPU machine, with .gpu/run.sh
  ci    `lint`, then the workspace tests (VULNMAP_REQUIRE_ASSETS=1, so missing shared assets
        fail instead of skipping)
  lint  formatting, and clippy with warnings as errors (the workspace lints among them)";

pub(crate) fn root() -> PathBuf {
    // xtask/ is a folder of the workspace root at compile time: it always has a parent.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest folder has a parent")
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

/// Formatting, then clippy with warnings as errors (the workspace lints among them).
fn lint() -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])
}

fn ci() -> Result<()> {
    lint()?;
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

/// A Python that imports torch: `$VULNMAP_TORCH_PYTHON`, the bench's venv, `python3`, or a new
/// venv in `target/bench/venv` with torch installed by pip.
fn torch_python() -> Option<PathBuf> {
    let imports_torch = |python: &Path| {
        Command::new(python)
            .args(["-c", "import torch, torchvision"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let venv = root().join("target/bench/venv");
    let candidates = [
        std::env::var_os("VULNMAP_TORCH_PYTHON").map(PathBuf::from),
        Some(venv.join("bin/python")),
        Some(PathBuf::from("python3")),
    ];
    if let Some(found) = candidates.into_iter().flatten().find(|p| imports_torch(p)) {
        return Some(found);
    }
    eprintln!(
        "no Python with torch found; making {} (pip install torch torchvision)",
        venv.display()
    );
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "-q",
                "torch",
                "torchvision",
                "--index-url",
                "https://download.pytorch.org/whl/cpu",
            ])
            .status()
            .is_ok_and(|s| s.success())
        || Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "torch", "torchvision"])
            .status()
            .is_ok_and(|s| s.success());
    let python = venv.join("bin/python");
    (made && imports_torch(&python)).then_some(python)
}

fn bench(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let no_torch = args.iter().any(|a| a == "--no-torch");
    let value = |flag: &str| -> Result<Option<String>> {
        match args.iter().position(|a| a == flag) {
            Some(i) => match args.get(i + 1) {
                Some(v) => Ok(Some(v.clone())),
                None => bail!("{flag} needs a value"),
            },
            None => Ok(None),
        }
    };
    if let Some(from) = value("--from")? {
        let from = PathBuf::from(from);
        let read = |name: &str| -> Result<serde_json::Value> {
            let path = from.join(name);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
        };
        let torch = if no_torch {
            None
        } else {
            Some(read("torch.json")?)
        };
        return tabulate(&read("vulnmap.json")?, torch.as_ref());
    }
    let device = value("--device")?.unwrap_or_else(|| "cpu".into());
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let onnx_dir = dir.join("onnx");
    let only = value("--only")?;
    let python = if no_torch { None } else { torch_python() };
    if python.is_none() && !no_torch {
        eprintln!("PyTorch unavailable: printing vulnmap's numbers without ratios");
    }
    let torch = |extra: &[&str]| -> Result<serde_json::Value> {
        let python = python.as_ref().context("no PyTorch")?;
        let out = Command::new(python)
            .arg(root().join("bench/torch_reference.py"))
            .args(["--device", &device])
            .args(extra)
            .output()
            .context("running bench/torch_reference.py")?;
        if !out.status.success() {
            bail!(
                "torch_reference.py failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let ours_path = dir.join("vulnmap.json");
    let vulnmap = |extra: &[&str]| -> Result<serde_json::Value> {
        let mut args = vec!["run", "--release", "-p", "vulnmap-bench"];
        if device.starts_with("cuda") {
            args.extend(["--features", "cuda"]);
        }
        args.push("--");
        if quick {
            args.push("--quick");
        }
        args.extend(extra);
        let ours_file = ours_path.display().to_string();
        args.extend(["--device", device.as_str(), "--json", ours_file.as_str()]);
        cargo(&args)?;
        Ok(serde_json::from_str(&std::fs::read_to_string(&ours_path)?)?)
    };
    let only_args: Vec<&str> = only.iter().flat_map(|o| ["--only", o.as_str()]).collect();
    let onnx_arg = onnx_dir.display().to_string();
    let (ours, torch) = if quick || python.is_none() {
        // vulnmap's rows alone (the ONNX ones when an earlier run exported the families), or
        // PyTorch's quick rows then vulnmap's.
        let torch = python
            .is_some()
            .then(|| torch(&[&["--quick"], only_args.as_slice()].concat()))
            .transpose()?;
        let mut args = only_args.clone();
        if !quick && onnx_dir.is_dir() {
            args.extend(["--onnx-dir", onnx_arg.as_str()]);
        }
        (vulnmap(&args)?, torch)
    } else {
        // Each group of rows runs on both sides back to back, PyTorch's first (it exports the
        // ONNX family that vulnmap's rows load): the VM's speed drifts by tens of percent within
        // minutes, and both sides of a ratio then share the drift.
        let mut torch_doc = torch(&only_args)?;
        let mut ours = vulnmap(&only_args)?;
        let wanted = |name: &str| {
            only.as_deref()
                .is_none_or(|o| name.starts_with(o) || o.starts_with(name))
        };
        let families = torch(&["--list-onnx-families"])?;
        for family in families.as_array().into_iter().flatten() {
            let family = family.as_str().context("a family name")?;
            // PyTorch's Lite0 is also the reference of vulnmap's native Lite0 rows.
            let mut groups = vec![format!("onnx-{family}")];
            if family == "efficientnet_lite0" {
                groups.push(format!("native-{family}"));
            }
            groups.retain(|g| wanted(g));
            if groups.is_empty() {
                continue;
            }
            let theirs = torch(&["--onnx-dir", &onnx_arg, "--onnx-family", family])?;
            append_measurements(&mut torch_doc, &theirs);
            for group in &groups {
                // The narrower of the group and `--only` (which may name one row).
                let rows_wanted = match &only {
                    Some(o) if o.starts_with(group.as_str()) => o.as_str(),
                    _ => group.as_str(),
                };
                let rows = vulnmap(&["--onnx-dir", &onnx_arg, "--only", rows_wanted])?;
                append_measurements(&mut ours, &rows["measurements"]);
            }
        }
        (ours, Some(torch_doc))
    };
    std::fs::write(&ours_path, serde_json::to_string_pretty(&ours)?)?;
    println!("CPU: {}\n", cpu_description());
    tabulate(&ours, torch.as_ref())
}

/// Appends the rows `more` (a list of measurements) to `doc`'s measurements.
fn append_measurements(doc: &mut serde_json::Value, more: &serde_json::Value) {
    if let Some(list) = doc["measurements"].as_array_mut() {
        list.extend(more.as_array().into_iter().flatten().cloned());
    }
}

/// This machine's CPU model, the widest SIMD level PyTorch and gemm can use on it, and its cores:
/// figures from an AVX2 machine and an AVX-512 one do not compare.
fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    describe_cpu(&info, cores)
}

fn describe_cpu(cpuinfo: &str, cores: usize) -> String {
    let field = |name: &str| {
        cpuinfo
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(key, _)| key.trim() == name)
            .map(|(_, value)| value.trim())
    };
    let model = field("model name").unwrap_or("unknown CPU");
    let flags: Vec<&str> = field("flags").unwrap_or("").split_whitespace().collect();
    let simd = if flags.contains(&"avx512f") {
        "AVX-512"
    } else if flags.contains(&"avx2") {
        "AVX2"
    } else {
        "neither AVX2 nor AVX-512"
    };
    format!("{model}, {simd}, {cores} cores")
}

/// Prints the Markdown table of vulnmap's measurements with PyTorch's beside them, and writes
/// both to `target/bench/bench.json`.
fn tabulate(ours: &serde_json::Value, torch: Option<&serde_json::Value>) -> Result<()> {
    let find = |doc: &serde_json::Value, name: &str, batch: u64| {
        doc["measurements"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == name && m["batch"] == batch))
            .cloned()
    };
    let mib = |m: &serde_json::Value| m["peak_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64;
    let machine_peak = ours["fma_peak_gflops"].as_f64();
    if let Some(peak) = machine_peak {
        println!(
            "FMA peak (measured, all cores, {}): {peak:.0} GFLOP/s; GFLOP/s columns count 2 per \
             multiply-add of the convolutions and matrix products, the input gradient's backward \
             as much again as the forward\n",
            ours["fma_peak_simd"].as_str().unwrap_or("?")
        );
    }
    println!("| measurement | N | vulnmap s | vulnmap s/image | vulnmap peak MiB | PyTorch s | PyTorch peak MiB | ratio | GFLOP/s vulnmap / PyTorch (% of peak) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for m in ours["measurements"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or("");
        let batch = m["batch"].as_u64().unwrap_or(1);
        let ours_s = m["seconds"].as_f64().unwrap_or(f64::NAN);
        let theirs = torch.and_then(|t| find(t, name, batch));
        let their_s = theirs.as_ref().and_then(|t| t["seconds"].as_f64());
        let (their_col, their_mib, ratio) = match (&theirs, their_s) {
            (Some(t), Some(s)) => (
                format!("{s:.4}"),
                format!("{:.0}", mib(t)),
                format!("{:.2}x", ours_s / s),
            ),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        let gflops = match m["flops"].as_f64() {
            Some(flops) => {
                let rate = |s: f64| flops / s / 1e9;
                let share = |s: f64| {
                    machine_peak
                        .map_or(String::new(), |p| format!(" ({:.0}%)", 100.0 * rate(s) / p))
                };
                let theirs = their_s.map_or("-".into(), |s| format!("{:.0}{}", rate(s), share(s)));
                format!("{:.0}{} / {theirs}", rate(ours_s), share(ours_s))
            }
            None => "-".into(),
        };
        println!(
            "| {name} | {batch} | {ours_s:.4} | {:.4} | {:.0} | {their_col} | {their_mib} | {ratio} | {gflops} |",
            m["seconds_per_image"].as_f64().unwrap_or(f64::NAN),
            mib(m)
        );
    }
    let combined = serde_json::json!({"vulnmap": ours, "pytorch": torch});
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&combined)?)?;
    eprintln!("written {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cpu_description_names_the_widest_simd_level() {
        let info = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f\n";
        assert_eq!(super::describe_cpu(info, 2), "Some CPU, AVX-512, 2 cores");
        let info = "model name\t: Other\nflags\t\t: fpu avx avx2\n";
        assert_eq!(super::describe_cpu(info, 4), "Other, AVX2, 4 cores");
        assert_eq!(
            super::describe_cpu("", 1),
            "unknown CPU, neither AVX2 nor AVX-512, 1 cores"
        );
    }
}
