//! Extremal perturbation against a truth by construction: a model that reads only the
//! high-frequency energy of one quadrant must get its preserve and dual masks there, for every
//! area optimised in one batch. (The delete game alone is weaker, in TorchRay too: a blurred
//! region's gradient is small, so its masks need not settle on the quadrant.)

mod common;

use candle_core::{DType, Device, Result as CResult, Tensor};
use common::device;
use vulnmap_data::random;
use vulnmap_models::{Classes, Classifier, InputSpec};
use vulnmap_saliency::{ExtremalPerturbation, ExtremalReward, ExtremalVariant};

const SIZE: usize = 64;
const HALF: usize = SIZE / 2;

/// Class 0's logit is the squared horizontal differences of the top-left quadrant (what a blur
/// removes); class 1's is zero.
struct TopLeftTexture {
    spec: InputSpec,
    classes: Classes,
    device: Device,
}

impl Classifier for TopLeftTexture {
    fn arch(&self) -> &str {
        "top-left-texture"
    }
    fn input_spec(&self) -> &InputSpec {
        &self.spec
    }
    fn classes(&self) -> &Classes {
        &self.classes
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
    fn forward_t(&self, pixels: &Tensor, _train: bool) -> CResult<Tensor> {
        let quadrant = pixels.narrow(2, 0, HALF)?.narrow(3, 0, HALF)?;
        let diff = (quadrant.narrow(3, 1, HALF - 1)? - quadrant.narrow(3, 0, HALF - 1)?)?;
        let energy = (diff.sqr()?.flatten_from(1)?.sum_keepdim(1)? * 0.05)?;
        Tensor::cat(&[&energy, &energy.zeros_like()?], 1)
    }
    fn layers(&self) -> Vec<String> {
        vec!["input".into()]
    }
    fn default_layer(&self) -> String {
        "input".into()
    }
    fn features(&self, pixels: &Tensor, _layer: &str) -> CResult<Tensor> {
        Ok(pixels.clone())
    }
    fn forward_from(&self, features: &Tensor, _layer: &str) -> CResult<Tensor> {
        self.forward(features)
    }
}

fn model() -> TopLeftTexture {
    TopLeftTexture {
        spec: InputSpec {
            height: SIZE,
            width: SIZE,
            channels: 3,
            mean: [0.5; 3],
            std: [0.25; 3],
        },
        classes: Classes::numbered(2),
        device: device(),
    }
}

/// The fraction of each mask's mass in the top-left quadrant (with a few pixels of slack for the
/// mask's smooth edge).
fn mass_in_quadrant(masks: &Tensor) -> Vec<f32> {
    let (n, a, h, w) = masks.dims4().unwrap();
    let v = masks.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (0..n * a)
        .map(|m| {
            let plane = &v[m * h * w..(m + 1) * h * w];
            let total: f32 = plane.iter().sum();
            let inside: f32 = (0..h * w)
                .filter(|i| i / w < HALF + 4 && i % w < HALF + 4)
                .map(|i| plane[i])
                .sum();
            inside / total.max(1e-6)
        })
        .collect()
}

#[test]
fn a_model_that_reads_one_quadrant_gets_its_extremal_masks_there() {
    let model = model();
    let mut rng = random::rng(4, "extremal texture");
    let values = random::uniform_vec(&mut rng, 3 * SIZE * SIZE, 0.0, 1.0);
    let pixels = Tensor::from_vec(values, (1, 3, SIZE, SIZE), &device()).unwrap();
    let targets = [0];
    for variant in [ExtremalVariant::Preserve, ExtremalVariant::Dual] {
        let method = ExtremalPerturbation {
            areas: vec![0.1, 0.2],
            variant,
            reward: ExtremalReward::Simple,
            max_iters: 300,
            max_blur: 4.0,
            step: 4,
            sigma: 8.0,
            jitter: false,
            ..ExtremalPerturbation::default()
        };
        let masks = method.masks(&model, &pixels, &targets).unwrap();
        assert_eq!(masks.dims(), &[1, 2, SIZE, SIZE]);
        let inside = mass_in_quadrant(&masks);
        println!("{variant:?}: mass in the quadrant {inside:?}");
        for share in inside {
            assert!(share > 0.85, "{variant:?}: {share}");
        }
    }
}

#[test]
fn impossible_settings_are_refused_with_a_reason() {
    let model = model();
    let pixels = Tensor::zeros((1, 3, SIZE, SIZE), DType::F32, &device()).unwrap();
    for (method, expected) in [
        (
            ExtremalPerturbation {
                areas: vec![1.5],
                ..ExtremalPerturbation::default()
            },
            "area",
        ),
        (
            ExtremalPerturbation {
                areas: vec![],
                ..ExtremalPerturbation::default()
            },
            "no mask areas",
        ),
    ] {
        let e = method.masks(&model, &pixels, &[0]).unwrap_err().to_string();
        assert!(e.contains(expected), "{e}");
    }
}
