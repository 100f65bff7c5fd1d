//! The AVX2 path against the AVX-512 path, on one machine. gemm and vulnmap's own loops pick
//! their kernels by the CPU's features at run time, so one binary takes the AVX-512 path on an
//! AVX-512 CPU and the AVX2 + FMA path elsewhere. Valgrind's CPU emulates no AVX-512 (its CPUID
//! says so), so this test runs itself again under `valgrind --tool=none` to compute the same
//! logits and input gradients on the AVX2 path, and checks both paths against PyTorch and each
//! other. Without valgrind, or on a CPU without AVX-512, it skips with a reason, unless
//! `VULNMAP_REQUIRE_VALGRIND=1` (set by CI) makes a missing valgrind a failure.

use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use vulnmap_models::Classifier;
use vulnmap_testkit::compare::{cosine, max_abs, max_abs_diff, to_vec};
use vulnmap_testkit::{read_fixture, test_asset};

/// Models that between them run every kernel that dispatches by SIMD level: GEMM, the fused
/// convolutions (the 1 x 1 and stem convolutions of `mobilenet_v3_small`), depthwise, hard swish (`mobilenet_v3_small`), LayerNorm, erf-based GELU, the
/// linear layers (`convnext_small_config`), softmax (`vit_tiny`: the shared ViT's head is zero),
/// and the operator zoo's exp, pooling and normalisations. Shared fixtures, then this crate's.
const SHARED: &[&str] = &["mobilenet_v3_small", "convnext_small_config"];
const OWN: &[&str] = &["vit_tiny", "opzoo_opset17"];

/// Set in the child process: where it writes its logits and gradients.
const CHILD_OUT: &str = "VULNMAP_SIMD_PATHS_OUT";
const TEST_NAME: &str = "the_avx2_path_agrees_with_the_avx512_path";

/// Each model's `.onnx` and reference, or `None` (skipped) without the shared assets.
fn models() -> Option<Vec<(&'static str, PathBuf, PathBuf)>> {
    let own = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut out = Vec::new();
    for name in SHARED {
        out.push((
            *name,
            test_asset(&format!("fixtures/onnx/{name}.onnx"))?,
            test_asset(&format!("fixtures/onnx/{name}_reference.safetensors"))?,
        ));
    }
    for name in OWN {
        out.push((
            *name,
            own.join(format!("{name}.onnx")),
            own.join(format!("{name}_reference.safetensors")),
        ));
    }
    Some(out)
}

/// The first of the shared fixtures' two images, which every reference was computed on (one
/// image: valgrind is slow).
fn pixels() -> Option<Tensor> {
    let path = test_asset("fixtures/onnx/resnet_basic_1111_reference.safetensors")?;
    let pixels = read_fixture(&path, &Device::Cpu)["pixels"].narrow(0, 0, 1);
    Some(pixels.expect("the fixture holds images"))
}

/// The reference's `key` for the first image.
fn first(reference: &HashMap<String, Tensor>, key: &str) -> Tensor {
    reference[key]
        .narrow(0, 0, 1)
        .expect("the reference holds images")
}

/// Each model's logits and the input gradient of each image's top logit (the reference's
/// targets), keyed `MODEL/logits` and `MODEL/gradient`.
fn logits_and_gradients() -> Option<HashMap<String, Tensor>> {
    let device = Device::Cpu;
    let pixels = pixels()?;
    let mut out = HashMap::new();
    for (name, model, reference) in models()? {
        let reference = read_fixture(&reference, &device);
        let model = vulnmap_onnx::load(&model, &device).unwrap_or_else(|e| panic!("{name}: {e}"));
        let run = || -> candle_core::Result<(Tensor, Tensor)> {
            let x = Var::from_tensor(&pixels)?;
            let logits = model.forward(x.as_tensor())?;
            let targets = first(&reference, "target").to_dtype(DType::I64)?;
            let n = targets.dim(0)?;
            let picked = logits.gather(&targets.reshape((n, 1))?, 1)?.sum_all()?;
            let grads = picked.backward()?;
            let gradient = grads
                .get(x.as_tensor())
                .expect("a gradient reaches the pixels")
                .clone();
            Ok((logits.detach(), gradient))
        };
        let (logits, gradient) = run().unwrap_or_else(|e| panic!("{name}: {e}"));
        out.insert(format!("{name}/logits"), logits);
        out.insert(format!("{name}/gradient"), gradient);
    }
    Some(out)
}

/// Logits within `logits_tol` of the largest (relative), and each image's gradient with cosine
/// at least `cosine_min`.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, logits_tol: f64, cosine_min: f64) {
    let (g, w) = (to_vec(got), to_vec(want));
    let relative = max_abs_diff(&g, &w) / max_abs(&w).max(f64::MIN_POSITIVE);
    if what.ends_with("/logits") {
        assert!(
            relative <= logits_tol,
            "{what}: differ by {relative:e} (relative)"
        );
        return;
    }
    for i in 0..got.dim(0).expect("a batch axis") {
        let g = to_vec(&got.get(i).expect("image"));
        let w = to_vec(&want.get(i).expect("image"));
        if max_abs(&w) == 0.0 {
            assert!(max_abs(&g) < 1e-6, "{what}: image {i} should be zero");
            continue;
        }
        let c = cosine(&g, &w);
        assert!(c >= cosine_min, "{what}: image {i} has cosine {c}");
    }
}

fn valgrind_required() -> bool {
    std::env::var("VULNMAP_REQUIRE_VALGRIND").as_deref() == Ok("1")
}

#[test]
fn the_avx2_path_agrees_with_the_avx512_path() {
    if let Some(out) = std::env::var_os(CHILD_OUT) {
        // Under valgrind: the AVX2 path, or this test would compare a path with itself.
        #[cfg(target_arch = "x86_64")]
        assert!(
            !std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma"),
            "the child process should see AVX2 + FMA and no AVX-512"
        );
        let tensors = logits_and_gradients().expect("the parent found the fixtures");
        candle_core::safetensors::save(&tensors, out).expect("the child writes its results");
        return;
    }
    #[cfg(target_arch = "x86_64")]
    let has_avx512 = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let has_avx512 = false;
    if !has_avx512 {
        eprintln!("skipping: this CPU has no AVX-512, so its one path is fixtures.rs's");
        return;
    }
    if Command::new("valgrind").arg("--version").output().is_err() {
        let reason = "valgrind is not installed: the AVX2 path cannot be run on this AVX-512 CPU";
        assert!(
            !valgrind_required(),
            "{reason}; VULNMAP_REQUIRE_VALGRIND=1 requires it"
        );
        eprintln!("skipping: {reason}");
        return;
    }
    let Some(avx512) = logits_and_gradients() else {
        return;
    };
    let dir = tempfile::tempdir().expect("a temporary folder");
    let out = dir.path().join("avx2.safetensors");
    let exe = std::env::current_exe().expect("the test binary's path");
    let status = Command::new("valgrind")
        .args(["--tool=none", "--quiet"])
        .arg(&exe)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_OUT, &out)
        // Valgrind runs one thread at a time: rayon's workers would only wait on each other.
        .env("RAYON_NUM_THREADS", "1")
        .status()
        .expect("valgrind starts");
    assert!(
        status.success(),
        "the AVX2 run under valgrind failed: {status}"
    );
    let avx2 = read_fixture(&out, &Device::Cpu);
    for (name, _, reference) in models().expect("found above") {
        let reference = read_fixture(&reference, &Device::Cpu);
        for (key, fixture_key) in [
            ("logits", "logits_eval"),
            ("gradient", "grad_pixels_top_logit"),
        ] {
            let what = format!("{name}/{key}");
            // Each path against PyTorch with fixtures.rs's tolerances, and the two paths
            // against each other, logits ten times tighter.
            assert_close(
                &format!("AVX2 {what}"),
                &avx2[&what],
                &first(&reference, fixture_key),
                1e-4,
                0.99999,
            );
            assert_close(
                &format!("AVX-512 {what}"),
                &avx512[&what],
                &first(&reference, fixture_key),
                1e-4,
                0.99999,
            );
            assert_close(
                &format!("AVX2 against AVX-512 {what}"),
                &avx2[&what],
                &avx512[&what],
                1e-5,
                0.99999,
            );
            let (a, b) = (to_vec(&avx2[&what]), to_vec(&avx512[&what]));
            println!(
                "{what}: AVX2 and AVX-512 differ by at most {:e} (largest value {:e})",
                max_abs_diff(&a, &b),
                max_abs(&b)
            );
        }
    }
}
