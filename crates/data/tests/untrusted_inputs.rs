//! Property tests of the readers of untrusted files: mutated and truncated images and arbitrary
//! manifests give an image, a dataset or an error, never a panic, and never an image larger than
//! the pixel budget. Cases are bounded so the suite stays quick.

use proptest::prelude::*;
use std::io::Cursor;
use std::path::Path;
use vulnmap_data::image_io::{load_rgb, max_pixels};
use vulnmap_data::{Dataset, ManifestOptions};
use vulnmap_testkit::mutate::mutate;

fn encoded(format: image::ImageFormat) -> Vec<u8> {
    let mut img = image::RgbImage::new(24, 16);
    for (x, y, p) in img.enumerate_pixels_mut() {
        *p = image::Rgb([(x * 10) as u8, (y * 15) as u8, ((x ^ y) * 7) as u8]);
    }
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
    bytes
}

fn check_image(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    match load_rgb(&path) {
        Ok(img) => {
            let (w, h) = img.dimensions();
            assert!(u64::from(w) * u64::from(h) <= max_pixels());
        }
        Err(e) => assert!(e.to_string().contains(name), "{e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn mutated_pngs_and_jpegs_decode_or_fail_naming_the_file(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        keep in 0.0f64..=1.0,
    ) {
        let dir = tempfile::tempdir().unwrap();
        for (format, name) in [(image::ImageFormat::Png, "x.png"), (image::ImageFormat::Jpeg, "x.jpg")] {
            check_image(dir.path(), name, &mutate(encoded(format), &edits, keep));
        }
    }

    #[test]
    fn arbitrary_bytes_are_never_taken_for_an_image_that_panics(
        bytes in prop::collection::vec(any::<u8>(), 1..512),
    ) {
        let dir = tempfile::tempdir().unwrap();
        check_image(dir.path(), "junk.png", &bytes);
        let mut jpeg = vec![0xFF, 0xD8];
        jpeg.extend(&bytes);
        check_image(dir.path(), "junk.jpg", &jpeg);
    }

    #[test]
    fn arbitrary_manifests_give_a_dataset_or_an_error_naming_the_manifest(
        rows in prop::collection::vec(
            (
                prop::sample::select(vec!["a.png", "missing.png", "", "../a.png", "a.png,extra"]),
                prop::sample::select(vec!["healthy", "lesion", "", "x\"y", "lesion,healthy"]),
                prop::sample::select(vec!["CFP", "FA", "OCT", ""]),
            ),
            0..6,
        ),
        header in prop::sample::select(vec![
            "path,label",
            "path,label,modality,patient_id",
            "label,path",
            "image,label",
            "",
        ]),
    ) {
        let dir = tempfile::tempdir().unwrap();
        image::RgbImage::new(4, 4).save(dir.path().join("a.png")).unwrap();
        let mut text = format!("{header}\n");
        for (path, label, modality) in &rows {
            text.push_str(&format!("{path},{label},{modality},p1\n"));
        }
        let manifest = dir.path().join("manifest.csv");
        std::fs::write(&manifest, &text).unwrap();
        for skip_bad in [false, true] {
            let options = ManifestOptions { skip_bad, verify: true, ..Default::default() };
            match Dataset::from_manifest(&manifest, &options) {
                Ok((dataset, _)) => prop_assert!(dataset.samples.iter().all(|s| s.label < dataset.classes.len())),
                Err(e) => prop_assert!(e.to_string().contains("manifest.csv"), "{}", e),
            }
        }
    }
}
