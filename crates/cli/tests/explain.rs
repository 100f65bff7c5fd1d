//! `vulnmap explain`: maps and overlays written as PNGs, one JSON object per image.

use std::process::Command;
use vulnmap_testkit::test_asset;

#[test]
fn explain_writes_a_map_and_an_overlay_per_image() {
    let (Some(weights), Some(image)) = (
        test_asset("assets/weights/efficientnet-lite0.safetensors"),
        test_asset("assets/images/imagenet/coffee.png"),
    ) else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let result = Command::new(env!("CARGO_BIN_EXE_vulnmap"))
        .args([
            "explain",
            "-q",
            "--json",
            "--method",
            "grad-cam",
            "--model",
            "efficientnet-lite0",
            "--weights",
        ])
        .arg(&weights)
        .arg(&image)
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(line["target"], 967);
    assert_eq!(line["target_name"], "espresso");
    for key in ["map", "overlay"] {
        let png = image::open(line[key].as_str().unwrap()).unwrap();
        assert_eq!((png.width(), png.height()), (224, 224));
    }

    let bad = Command::new(env!("CARGO_BIN_EXE_vulnmap"))
        .args([
            "explain",
            "--method",
            "deconvnet",
            "--model",
            "efficientnet-lite0",
            "x.png",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("deconvnet") && err.contains("grad-cam"),
        "{err}"
    );
}

#[test]
fn two_images_with_one_file_name_never_write_the_same_output() {
    let (Some(weights), Some(image)) = (
        test_asset("assets/weights/efficientnet-lite0.safetensors"),
        test_asset("assets/images/imagenet/coffee.png"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let inputs: Vec<_> = ["a", "b"]
        .iter()
        .map(|d| {
            let folder = dir.path().join(d);
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::copy(&image, folder.join("coffee.png")).unwrap();
            folder.join("coffee.png")
        })
        .collect();
    let out = dir.path().join("out");
    let result = Command::new(env!("CARGO_BIN_EXE_vulnmap"))
        .args(["explain", "-q", "--json", "--method", "gradient"])
        .args(["--model", "efficientnet-lite0", "--weights"])
        .arg(&weights)
        .args(&inputs)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let maps: Vec<String> = String::from_utf8_lossy(&result.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["map"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(maps.len(), 2);
    assert_ne!(maps[0], maps[1]);
    for m in &maps {
        assert!(std::path::Path::new(m).is_file(), "{m}");
    }
}

/// The values of a `.npy` file of little-endian f32 (its shape from the header, by hand).
fn read_npy(path: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"));
    let shape = header.split("'shape': (").nth(1).unwrap();
    let shape: Vec<usize> = shape[..shape.find(')').unwrap()]
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let values = bytes[10 + len..]
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (shape, values)
}

#[test]
fn save_maps_writes_the_map_and_the_raw_attribution_as_arrays() {
    let (Some(weights), Some(image)) = (
        test_asset("assets/weights/efficientnet-lite0.safetensors"),
        test_asset("assets/images/imagenet/coffee.png"),
    ) else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let result = Command::new(env!("CARGO_BIN_EXE_vulnmap"))
        .args(["explain", "-q", "--json", "--method", "gradient"])
        .args(["--save-maps", "--raw", "--model", "efficientnet-lite0"])
        .arg("--weights")
        .arg(&weights)
        .arg(&image)
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(line["arrays"].as_array().unwrap().len(), 3, "{line}");
    let saved = candle_core::safetensors::load(
        out.path().join("coffee_gradient.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let map = saved["map"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (shape, npy) = read_npy(&out.path().join("coffee_gradient.npy"));
    assert_eq!(shape, [224, 224]);
    assert_eq!(npy, map);
    let (shape, raw) = read_npy(&out.path().join("coffee_gradient_raw.npy"));
    assert_eq!(shape, [3, 224, 224]);
    assert_eq!(saved["attribution"].dims(), [3, 224, 224]);
    // The map is the attribution post-processed: |channel sum|, clipped at the 99th percentile.
    let again = vulnmap_saliency::PostProcess::default()
        .apply(&saved["attribution"].unsqueeze(0).unwrap(), (224, 224))
        .unwrap();
    let again = again.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let worst = again
        .iter()
        .zip(&map)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "{worst}");
    assert!(raw.iter().any(|&v| v != 0.0));
}
