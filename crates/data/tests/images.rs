//! Decoding and preprocessing against independent truths: PIL's resize of the shared images
//! (the ResNet parity fixture), and synthetic files whose pixels are known.

use candle_core::{DType, Device};
use std::io::Cursor;
use vulnmap_data::image_io::{from_tensor, load_rgb, to_tensor};
use vulnmap_data::{save_png, Preprocess};
use vulnmap_testkit::test_asset;

#[test]
fn resize_256_and_centre_crop_match_pil_on_chelsea_and_coffee() {
    let (Some(fixture), Some(chelsea), Some(coffee)) = (
        test_asset("fixtures/resnet50_parity.safetensors"),
        test_asset("assets/images/imagenet/chelsea.png"),
        test_asset("assets/images/imagenet/coffee.png"),
    ) else {
        return;
    };
    let want = candle_core::safetensors::load(&fixture, &Device::Cpu).unwrap()["pixels"].clone();
    let got = Preprocess::torchvision_eval(224)
        .load_batch(&[chelsea, coffee], &Device::Cpu)
        .unwrap();
    assert_eq!(got.dims(), want.dims());
    for i in 0..2 {
        let mad = (got.get(i).unwrap() - want.get(i).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("image {i}: mean |ours - PIL| = {mad:.5}");
        assert!(
            mad <= 0.01,
            "image {i}: mean absolute difference {mad} > 0.01"
        );
    }
}

#[test]
fn sixteen_bit_grey_becomes_three_equal_channels_at_full_precision() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fa16.png");
    let img = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(5, 3, |x, y| {
        image::Luma([(x * 10000 + y * 7) as u16])
    });
    img.save(&path).unwrap();
    let rgb = load_rgb(&path).unwrap();
    assert_eq!(rgb.dimensions(), (5, 3));
    let p = rgb.get_pixel(4, 2);
    let want = (4.0 * 10000.0 + 2.0 * 7.0) / 65535.0;
    for c in 0..3 {
        assert!(
            (p[c] - want).abs() < 1e-6,
            "channel {c}: {} vs {want}",
            p[c]
        );
    }
}

#[test]
fn rgba_drops_alpha_and_png_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rgba.png");
    image::RgbaImage::from_fn(4, 4, |x, _| image::Rgba([255, (x * 60) as u8, 0, 10]))
        .save(&path)
        .unwrap();
    let rgb = load_rgb(&path).unwrap();
    let t = to_tensor(&rgb).unwrap();
    assert_eq!(t.dims(), &[3, 4, 4]);
    let green: Vec<f32> = t.get(1).unwrap().get(0).unwrap().to_vec1().unwrap();
    assert_eq!(green, vec![0.0, 60.0 / 255.0, 120.0 / 255.0, 180.0 / 255.0]);

    // Tensor -> PNG -> tensor is exact for 8-bit values.
    let out = dir.path().join("back.png");
    save_png(&from_tensor(&t).unwrap(), &out).unwrap();
    let back = to_tensor(&load_rgb(&out).unwrap()).unwrap();
    let diff = (back - &t)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp")
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
}

/// An APP1 segment holding just the EXIF orientation tag.
fn exif_orientation_segment(orientation: u8) -> Vec<u8> {
    let mut seg = vec![0xFF, 0xE1, 0x00, 34];
    seg.extend_from_slice(b"Exif\0\0");
    seg.extend_from_slice(&[b'M', b'M', 0, 0x2A, 0, 0, 0, 8]); // big-endian TIFF, IFD at 8
    seg.extend_from_slice(&[0, 1]); // one entry
    seg.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, orientation, 0, 0]);
    seg.extend_from_slice(&[0, 0, 0, 0]); // no next IFD
    seg
}

#[test]
fn jpeg_exif_orientation_is_applied() {
    // 32 wide, 16 high: left half red, right half blue.
    let img = image::RgbImage::from_fn(32, 16, |x, _| {
        if x < 16 {
            image::Rgb([255, 0, 0])
        } else {
            image::Rgb([0, 0, 255])
        }
    });
    let mut jpeg = Vec::new();
    img.write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
    let mut tagged = jpeg[..2].to_vec();
    tagged.extend(exif_orientation_segment(6)); // "rotate 90 degrees clockwise to view"
    tagged.extend_from_slice(&jpeg[2..]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rotated.jpg");
    std::fs::write(&path, &tagged).unwrap();

    let rgb = load_rgb(&path).unwrap();
    assert_eq!(rgb.dimensions(), (16, 32), "width and height swap");
    // The left (red) half is now on top.
    let top = rgb.get_pixel(8, 4);
    let bottom = rgb.get_pixel(8, 28);
    assert!(top[0] > 0.8 && top[2] < 0.2, "top should be red: {top:?}");
    assert!(
        bottom[2] > 0.8 && bottom[0] < 0.2,
        "bottom should be blue: {bottom:?}"
    );
}

#[test]
fn corrupt_and_foreign_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.png");
    std::fs::write(&text, "not an image").unwrap();
    let msg = load_rgb(&text).unwrap_err().to_string();
    assert!(
        msg.contains("notes.png") && msg.contains("cannot decode"),
        "{msg}"
    );
    let unnamed = dir.path().join("notes");
    std::fs::write(&unnamed, "not an image").unwrap();
    let msg = load_rgb(&unnamed).unwrap_err().to_string();
    assert!(
        msg.contains("notes") && msg.contains("PNG or JPEG"),
        "{msg}"
    );

    let cut = dir.path().join("cut.png");
    let mut png = Vec::new();
    image::RgbImage::new(64, 64)
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(&cut, &png[..png.len() / 2]).unwrap();
    let msg = load_rgb(&cut).unwrap_err().to_string();
    assert!(
        msg.contains("cut.png") && msg.contains("cannot decode"),
        "{msg}"
    );

    let missing = dir.path().join("absent.jpg");
    let msg = load_rgb(&missing).unwrap_err().to_string();
    assert!(msg.contains("absent.jpg"), "{msg}");
}

#[test]
fn batches_need_one_size_and_say_which_file_differs() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.png");
    image::RgbImage::new(8, 8).save(&a).unwrap();
    image::RgbImage::new(8, 6).save(&b).unwrap();
    let msg = Preprocess::none()
        .load_batch(&[&a, &b], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("b.png"), "{msg}");
    let batch = Preprocess::resize_crop(6, 6)
        .load_batch(&[&a, &b], &Device::Cpu)
        .unwrap();
    assert_eq!(batch.dims(), &[2, 3, 6, 6]);
    assert_eq!(batch.dtype(), DType::F32);
}

/// A pipe would block reading forever and a device never ends: only regular files are read,
/// and the error says what the path is instead.
#[test]
fn folders_devices_and_pipes_are_refused_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.png");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    let mut paths = vec![dir.path().to_path_buf()];
    if made.is_ok_and(|s| s.success()) {
        paths.push(fifo);
    }
    if std::path::Path::new("/dev/zero").exists() {
        paths.push("/dev/zero".into());
    }
    for path in paths {
        let e = vulnmap_data::load_rgb(&path).unwrap_err().to_string();
        assert!(
            e.contains("not a regular file") && e.contains(&path.display().to_string()),
            "{e}"
        );
    }
}

/// CRC-32 (IEEE) of PNG chunks, bit by bit: for headers the tests rewrite.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A small PNG whose header claims `w x h` pixels (the data stays that of an 8 x 8 image).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = Vec::new();
    image::RgbImage::new(8, 8)
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

#[test]
fn images_over_the_pixel_budget_or_of_extreme_shape_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    // 100 000 x 100 000 pixels would take 120 GB as f32: refused from its header alone.
    let bomb = dir.path().join("bomb.png");
    std::fs::write(&bomb, png_claiming(100_000, 100_000)).unwrap();
    let msg = load_rgb(&bomb).unwrap_err().to_string();
    assert!(
        msg.contains("bomb.png") && msg.contains("100000 x 100000") && msg.contains("budget"),
        "{msg}"
    );
    let strip = dir.path().join("strip.png");
    std::fs::write(&strip, png_claiming(65_000, 8)).unwrap();
    let msg = load_rgb(&strip).unwrap_err().to_string();
    assert!(
        msg.contains("strip.png") && msg.contains("longer than"),
        "{msg}"
    );
    // The same file with its true header is read.
    let fine = dir.path().join("fine.png");
    std::fs::write(&fine, png_claiming(8, 8)).unwrap();
    assert!(load_rgb(&fine).is_ok());
}

#[test]
fn truncated_jpegs_are_errors_not_grey_images() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = image::RgbImage::new(64, 48);
    for (x, y, p) in img.enumerate_pixels_mut() {
        *p = image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x * y) % 251) as u8]);
    }
    let mut jpeg = Vec::new();
    img.write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    let whole = dir.path().join("whole.jpg");
    std::fs::write(&whole, &jpeg).unwrap();
    assert_eq!(load_rgb(&whole).unwrap().dimensions(), (64, 48));
    // Bytes after the end marker (as some cameras append) are harmless.
    let trailing = dir.path().join("trailing.jpg");
    std::fs::write(&trailing, [jpeg.as_slice(), b"appended"].concat()).unwrap();
    assert!(load_rgb(&trailing).is_ok());
    for keep in [jpeg.len() - 2, jpeg.len() / 2, 700] {
        let cut = dir.path().join(format!("cut{keep}.jpg"));
        std::fs::write(&cut, &jpeg[..keep]).unwrap();
        let msg = load_rgb(&cut).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("cut{keep}.jpg")) && msg.contains("end-of-image"),
            "{msg}"
        );
    }
    for name in ["imagenet/rocket.jpg", "fundus/retina.jpg"] {
        if let Some(path) = test_asset(&format!("assets/images/{name}")) {
            load_rgb(&path).unwrap();
        }
    }
}

/// A file name that is not UTF-8 (possible on Linux) is still named, lossily, in the error.
#[cfg(unix)]
#[test]
fn a_non_utf8_path_is_named_lossily() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9.png");
    let path = dir.path().join(name);
    if std::fs::write(&path, "not an image").is_err() {
        return; // a filesystem that insists on UTF-8 names
    }
    let msg = load_rgb(&path).unwrap_err().to_string();
    assert!(msg.contains("caf\u{FFFD}.png"), "{msg}");
}
