//! `vulnmap-bench [--quick] [--only NAME] [--onnx-dir DIR] [--device D] [--json PATH]`: runs the measurements and prints a line
//! per measurement on stderr and, with `--json`, writes them all (what `cargo xtask bench` reads).

use anyhow::{bail, Context, Result};
use vulnmap_bench::{run, Settings};

fn main() -> Result<()> {
    vulnmap_bench::memory::keep_freed_memory();
    let mut settings = Settings::full();
    let mut device = "cpu".to_string();
    let mut json = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => settings = Settings::quick(),
            "--device" => device = args.next().context("--device needs a value")?,
            "--json" => json = Some(args.next().context("--json needs a path")?),
            "--only" => settings.only = Some(args.next().context("--only needs a name")?),
            "--onnx-dir" => {
                settings.onnx_dir = Some(args.next().context("--onnx-dir needs a folder")?.into())
            }
            other => bail!("unknown argument `{other}`; usage: vulnmap-bench [--quick] [--only NAME] [--onnx-dir DIR] [--device D] [--json PATH]"),
        }
    }
    let device = vulnmap_models::parse_device(&device)?;
    let measurements = run(&settings, &device, |m| {
        eprintln!(
            "{:<24} N={:<3} {:>9.4} s  ({:.4} s/image)  peak {:>7.1} MiB",
            m.name,
            m.batch,
            m.seconds,
            m.seconds_per_image,
            m.peak_bytes as f64 / (1 << 20) as f64
        );
    })?;
    if let Some(path) = json {
        let peak = vulnmap_bench::peak::fma_peak_gflops();
        let doc = serde_json::json!({
            "fma_peak_gflops": peak.map(|(gflops, _)| gflops),
            "fma_peak_simd": peak.map(|(_, level)| level),
            "settings": settings,
            "device": format!("{device:?}"),
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "measurements": measurements,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
