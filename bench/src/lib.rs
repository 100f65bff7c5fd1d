//! vulnmap's speed measurements, the numbers in BENCHMARKS.md: ResNet50 at 224 in f32, forward
//! and forward + input gradient at several batch sizes, SmoothGrad-25 per image, one attack
//! iteration per image (generator + classifier + backward), a local-attack map per image, and
//! the peak memory of each; with a folder of exported ONNX families, their rows and the native
//! EfficientNet-Lite0's. Rows count their floating-point operations where the architecture's
//! multiply-adds are known.
//!
//! Timings are medians of repeated runs after a warm-up. Peak memory is counted by the global
//! allocator this crate installs (host memory; on CUDA it is the host side only).
//!
//! Modules: this one (the measurements), [`memory`] (the counting allocator), [`peak`] (the
//! machine's measured FMA peak).
//!
//! Cargo features: `cuda`, `cudnn` (as vulnmap-models').

pub mod memory;
pub mod peak;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::time::Instant;
use vulnmap_attacks::{local::local_attack, local::LocalAttack, random::random_attack};
use vulnmap_attacks::{AttackConfig, Goal};
use vulnmap_models::{zoo, Arch, Classes, Classifier};
use vulnmap_saliency::{input_gradients, Method, SmoothGrad, WindowGrid};

/// What to measure.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// The architecture's CLI name, e.g. `resnet50`; its weights are random (see [`model`]).
    pub arch: String,
    /// Input side.
    pub size: usize,
    /// Batch sizes of the forward and forward + gradient measurements.
    pub batches: Vec<usize>,
    /// Noisy samples SmoothGrad averages, all in one batch.
    pub smoothgrad_samples: usize,
    /// Images attacked together in the attack-iteration measurement.
    pub attack_images: usize,
    /// Local attack: window, stride, and the (fixed) iterations per window.
    pub window: usize,
    /// Pixels between neighbouring local-attack windows.
    pub stride: usize,
    /// Generator updates per local-attack window.
    pub local_iters: usize,
    /// Timed runs per measurement (after one warm-up) ...
    pub repeats: usize,
    /// ... or more for short calls, until about this many seconds are timed.
    pub min_seconds: f64,
    /// Only the measurements whose name starts with this.
    pub only: Option<String>,
    /// A folder of `onnx-FAMILY.onnx` files (the PyTorch side exports them): each one's
    /// forward, forward + input gradient and SmoothGrad through vulnmap-onnx, and the native
    /// EfficientNet-Lite0's.
    pub onnx_dir: Option<std::path::PathBuf>,
}

impl Settings {
    /// The full benchmark: ResNet50 at 224, N = 1, 8, 32, the paper's window (100, stride 50).
    pub fn full() -> Self {
        Self {
            arch: "resnet50".into(),
            size: 224,
            batches: vec![1, 8, 32],
            smoothgrad_samples: 25,
            attack_images: 8,
            window: 100,
            stride: 50,
            local_iters: 5,
            repeats: 3,
            min_seconds: 1.0,
            only: None,
            onnx_dir: None,
        }
    }

    /// Small sizes that run in seconds (CI runs these so the benchmark cannot rot).
    pub fn quick() -> Self {
        Self {
            arch: "tiny-resnet".into(),
            size: 64,
            batches: vec![1, 2],
            smoothgrad_samples: 4,
            attack_images: 2,
            window: 32,
            stride: 32,
            local_iters: 2,
            repeats: 1,
            min_seconds: 0.0,
            only: None,
            onnx_dir: None,
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// `forward`, `forward+input-gradient`, `smoothgrad`, `attack-iteration`, `local-attack-map`.
    pub name: String,
    /// Images per call.
    pub batch: usize,
    /// Median seconds per call ...
    pub seconds: f64,
    /// ... and per image.
    pub seconds_per_image: f64,
    /// Most bytes allocated at once during a call, above what was allocated before it.
    pub peak_bytes: usize,
    /// Floating-point operations of a call (2 per multiply-add of the convolutions and matrix
    /// products; the input gradient's backward as many again as the forward), where counted.
    pub flops: Option<f64>,
    /// What exactly was timed.
    pub note: String,
}

/// Times `f` (median of at least `repeats.0` runs after a warm-up) and its peak memory.
///
/// Short calls run more often, until about `repeats.1` seconds are timed (at most 15 runs): on a
/// shared machine a median of three 60 ms runs moves by a quarter between runs of the benchmark.
fn time(repeats: (usize, f64), mut f: impl FnMut() -> Result<()>) -> Result<(f64, usize)> {
    let start = Instant::now();
    f()?;
    let warm_up = start.elapsed().as_secs_f64().max(1e-6);
    let repeats = repeats
        .0
        .max(((repeats.1 / warm_up).ceil() as usize).min(15));
    let mut times = Vec::with_capacity(repeats);
    let mut peak = 0;
    for _ in 0..repeats.max(1) {
        let base = memory::reset_peak();
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
        peak = peak.max(memory::peak().saturating_sub(base));
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], peak))
}

/// The model under test: freshly initialised weights, loaded back as constants (as checkpoint
/// weights are), so no weight gradients are computed.
pub fn model(arch: &str, device: &Device) -> Result<Box<dyn Classifier>> {
    let arch: Arch = arch.parse()?;
    let classes = Classes::for_head(if arch == Arch::TinyResNet { 2 } else { 1000 });
    let (_, varmap) = zoo::fresh(arch, &classes, 0, DType::F32, device)?;
    let dir = std::env::temp_dir().join(format!("vulnmap-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.safetensors", arch.name()));
    varmap.save(&path)?;
    let model = zoo::load(arch, Some(&path), DType::F32, device)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(model)
}

/// Runs every measurement of `settings` on `device`, reporting each as it finishes.
pub fn run(
    settings: &Settings,
    device: &Device,
    mut report: impl FnMut(&Measurement),
) -> Result<Vec<Measurement>> {
    let model = model(&settings.arch, device)?;
    let model = model.as_ref();
    let s = settings.size;
    let mut out = Vec::new();
    let repeats = (settings.repeats, settings.min_seconds);
    let wanted = |name: &str| {
        settings
            .only
            .as_deref()
            .is_none_or(|o| name.starts_with(o) || o.starts_with(name))
    };
    let mut push = |m: Measurement, out: &mut Vec<Measurement>| {
        report(&m);
        out.push(m);
    };
    let images = |n: usize| Tensor::rand(0f32, 1f32, (n, 3, s, s), device);
    let madds = multiply_adds_of(settings.onnx_dir.as_deref(), &settings.arch, device);
    let sync = |t: &Tensor| -> Result<()> {
        // Reading one value waits for the device to finish.
        t.flatten_all()?
            .get(0)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        Ok(())
    };

    for &n in settings.batches.iter().filter(|_| wanted("forward")) {
        let x = images(n)?;
        let (t, peak) = time(repeats, || sync(&model.forward(&x)?))?;
        push(
            measurement("forward", n, t, peak, "logits of N images").counting(madds, 1.0),
            &mut out,
        );
        let targets = vec![0usize; n];
        let (t, peak) = time(repeats, || sync(&input_gradients(model, &x, &targets, n)?))?;
        push(
            measurement(
                "forward+input-gradient",
                n,
                t,
                peak,
                "gradient of one logit per image w.r.t. the pixels",
            )
            .counting(madds, 2.0),
            &mut out,
        );
    }

    if wanted("smoothgrad") {
        let x = images(1)?;
        let smoothgrad = Method::SmoothGrad(SmoothGrad {
            samples: settings.smoothgrad_samples,
            batch_size: settings.smoothgrad_samples,
            ..SmoothGrad::default()
        });
        let (t, peak) = time(repeats, || sync(&smoothgrad.attribute(model, &x, &[0])?))?;
        push(
            measurement(
                "smoothgrad",
                1,
                t,
                peak,
                &format!("{} noisy samples in one batch", settings.smoothgrad_samples),
            )
            .counting(madds, 2.0 * settings.smoothgrad_samples as f64),
            &mut out,
        );
    }

    // An attack that cannot succeed (confidence 1 - 1e-9) runs exactly max_iters updates; the
    // difference of two lengths is the cost of the updates alone, without the setup.
    let n = settings.attack_images;
    let config = |iters: usize| AttackConfig {
        max_iters: iters,
        confidence: 1.0 - 1e-9,
        batch_size: n,
        ..AttackConfig::default()
    };
    if wanted("attack-iteration") {
        let x = images(n)?;
        let goals = vec![Goal::Untargeted; n];
        let (short, _) = time(repeats, || {
            random_attack(model, &x, &goals, &config(1)).map(|_| ())?;
            Ok(())
        })?;
        let (long, peak) = time(repeats, || {
            random_attack(model, &x, &goals, &config(4)).map(|_| ())?;
            Ok(())
        })?;
        let per_iteration = ((long - short) / 3.0).max(0.0);
        push(
            measurement(
                "attack-iteration",
                n,
                per_iteration,
                peak,
                "one generator update: generator, classifier, backward, Adam (N images banked)",
            ),
            &mut out,
        );
    }

    if wanted("local-attack-map") {
        let x = images(1)?;
        let spec = LocalAttack {
            window: settings.window,
            stride: settings.stride,
            ..LocalAttack::default()
        };
        let local_config = AttackConfig {
            batch_size: 16,
            ..config(settings.local_iters)
        };
        let windows = WindowGrid::new(spec.window, spec.stride)
            .positions((s, s))?
            .len();
        let (t, peak) = time((settings.repeats.min(2), 0.0), || {
            local_attack(model, &x, 0, Goal::Untargeted, &spec, &local_config).map(|_| ())?;
            Ok(())
        })?;
        push(
            measurement(
                "local-attack-map",
                1,
                t,
                peak,
                &format!(
                    "w = {}, s = {} ({windows} windows), {} updates per window, windows banked by 16",
                    settings.window, settings.stride, settings.local_iters
                ),
            ),
            &mut out,
        );
    }
    if let Some(dir) = &settings.onnx_dir {
        for m in onnx_rows(dir, device, repeats, &wanted, &sync)? {
            push(m, &mut out);
        }
    }
    Ok(out)
}

/// Forward, forward + input gradient (N = 1 and 16; ResNet50 also 8) and SmoothGrad-25 of each
/// `onnx-FAMILY.onnx` in `dir` through vulnmap-onnx, as `onnx-FAMILY/ROW`; and the same of the
/// native EfficientNet-Lite0, as `native-efficientnet_lite0/ROW`.
fn onnx_rows(
    dir: &std::path::Path,
    device: &Device,
    repeats: (usize, f64),
    wanted: &dyn Fn(&str) -> bool,
    sync: &dyn Fn(&Tensor) -> Result<()>,
) -> Result<Vec<Measurement>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    let mut family_rows = |prefix: String,
                           model: &dyn Classifier,
                           madds: Option<u64>,
                           batches: &[usize]|
     -> Result<()> {
        for &n in batches {
            let x = Tensor::rand(0f32, 1f32, (n, 3, 224, 224), device)?;
            let name = format!("{prefix}/forward");
            if wanted(&name) {
                let (t, peak) = time(repeats, || sync(&model.forward(&x)?))?;
                out.push(measurement(&name, n, t, peak, "logits of N images").counting(madds, 1.0));
            }
            let name = format!("{prefix}/forward+input-gradient");
            if wanted(&name) {
                let targets = vec![0usize; n];
                let (t, peak) = time(repeats, || sync(&input_gradients(model, &x, &targets, n)?))?;
                let note = "gradient of one logit per image w.r.t. the pixels";
                out.push(measurement(&name, n, t, peak, note).counting(madds, 2.0));
            }
        }
        let name = format!("{prefix}/smoothgrad");
        if wanted(&name) {
            let x = Tensor::rand(0f32, 1f32, (1, 3, 224, 224), device)?;
            let smoothgrad = Method::SmoothGrad(SmoothGrad {
                samples: 25,
                batch_size: 25,
                ..SmoothGrad::default()
            });
            let (t, peak) = time(repeats, || sync(&smoothgrad.attribute(model, &x, &[0])?))?;
            out.push(
                measurement(&name, 1, t, peak, "25 noisy samples in one batch")
                    .counting(madds, 50.0),
            );
        }
        Ok(())
    };
    for file in files {
        let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned());
        let Some(family) = stem.as_deref().and_then(|s| s.strip_prefix("onnx-")) else {
            continue;
        };
        let prefix = format!("onnx-{family}");
        if !wanted(&prefix) {
            continue;
        }
        let model = vulnmap_onnx::load(&file, device)?;
        let batches: &[usize] = if family == "resnet50" {
            &[1, 8, 16]
        } else {
            &[1, 16]
        };
        family_rows(prefix, &model, Some(model.multiply_adds()), batches)?;
    }
    let prefix = "native-efficientnet_lite0".to_string();
    if wanted(&prefix) {
        let lite0 = model("efficientnet-lite0", device)?;
        let madds = multiply_adds_of(Some(dir), "efficientnet_lite0", device);
        family_rows(prefix, lite0.as_ref(), madds, &[1, 16])?;
    }
    Ok(out)
}

fn measurement(name: &str, batch: usize, seconds: f64, peak: usize, note: &str) -> Measurement {
    Measurement {
        name: name.into(),
        batch,
        seconds,
        seconds_per_image: seconds / batch as f64,
        peak_bytes: peak,
        flops: None,
        note: note.into(),
    }
}

impl Measurement {
    /// This measurement with its operations counted: `passes` forward-pass equivalents (1 for
    /// logits, 2 for logits and the input gradient) of `batch` images of a model with
    /// `multiply_adds` per image.
    fn counting(self, multiply_adds: Option<u64>, passes: f64) -> Self {
        let flops = multiply_adds.map(|m| 2.0 * m as f64 * passes * self.batch as f64);
        Self { flops, ..self }
    }
}

/// Multiply-adds per image of the architecture `onnx-FAMILY.onnx` in `dir` holds (the bench's
/// PyTorch side exports them), counted by vulnmap-onnx.
fn multiply_adds_of(dir: Option<&std::path::Path>, family: &str, device: &Device) -> Option<u64> {
    let path = dir?.join(format!("onnx-{family}.onnx"));
    path.is_file()
        .then(|| vulnmap_onnx::load(&path, device).ok())
        .flatten()
        .map(|m| m.multiply_adds())
}
