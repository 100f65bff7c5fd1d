//! The field of view of images framed by a black surround (fundus photographs, angiograms): the
//! region a blurred baseline may blur. Blurring across the frame's edge mixes the black surround
//! into the image and leaves a ring the model has never seen, which a learned mask then keeps.

use crate::error::{ensure, Result};
use candle_core::{DType, Tensor};

/// A pixel whose brightest channel exceeds this (in [0, 1]) is lit: 10 / 255, above a JPEG's
/// noise in a black surround. Darker tissue inside the frame stays in view ([`field_of_view`]
/// fills between lit pixels).
pub const FIELD_OF_VIEW_THRESHOLD: f64 = 10.0 / 255.0;

/// `N x 1 x H x W`, 1 inside each image's field of view and 0 outside, of `images`
/// (`N x C x H x W` in [0, 1]): the pixels between the first and the last pixel brighter than
/// `threshold` both in their row and in their column. Dark tissue inside the frame (a fovea, a
/// non-perfused area) is in view; an image with no bright pixel, or with no black surround, is
/// in view everywhere.
pub fn field_of_view(images: &Tensor, threshold: f64) -> Result<Tensor> {
    ensure((0.0..1.0).contains(&threshold), || {
        format!("the field of view's threshold is a brightness in [0, 1), got {threshold}")
    })?;
    let (n, _, h, w) = images.dims4()?;
    let brightest = images
        .max_keepdim(1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut inside = vec![0f32; n * h * w];
    for (image, view) in brightest
        .chunks_exact(h * w)
        .zip(inside.chunks_exact_mut(h * w))
    {
        // Each row's and each column's first and last lit pixel, in one pass.
        let mut rows = vec![(usize::MAX, 0); h];
        let mut columns = vec![(usize::MAX, 0); w];
        for (i, _) in image
            .iter()
            .enumerate()
            .filter(|(_, &v)| f64::from(v) > threshold)
        {
            let (y, x) = (i / w, i % w);
            rows[y] = (rows[y].0.min(x), rows[y].1.max(x));
            columns[x] = (columns[x].0.min(y), columns[x].1.max(y));
        }
        let between = |(first, last): (usize, usize), i: usize| first <= i && i <= last;
        let mut any = false;
        for (i, v) in view.iter_mut().enumerate() {
            let (y, x) = (i / w, i % w);
            if between(rows[y], x) && between(columns[x], y) {
                *v = 1.0;
                any = true;
            }
        }
        if !any {
            view.fill(1.0);
        }
    }
    Ok(Tensor::from_vec(inside, (n, 1, h, w), images.device())?.to_dtype(images.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A bright disc of radius 10 centred in a 32 x 32 black frame, with a black 3 x 3 hole at
    /// its centre (dark tissue).
    fn framed_disc() -> Tensor {
        let mut v = vec![0f32; 3 * 32 * 32];
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let r = ((y as f32 - 15.5).powi(2) + (x as f32 - 15.5).powi(2)).sqrt();
                    let hole = (y as i32 - 15).abs() <= 1 && (x as i32 - 15).abs() <= 1;
                    if r < 10.0 && !hole {
                        v[(c * 32 + y) * 32 + x] = 0.6;
                    }
                }
            }
        }
        Tensor::from_vec(v, (1, 3, 32, 32), &Device::Cpu).unwrap()
    }

    #[test]
    fn the_view_is_the_framed_disc_with_its_dark_centre_and_not_the_surround() -> Result<()> {
        let view = field_of_view(&framed_disc(), FIELD_OF_VIEW_THRESHOLD)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let at = |y: usize, x: usize| view[y * 32 + x];
        assert_eq!(at(15, 15), 1.0, "the dark centre is inside the frame");
        assert_eq!(at(15, 8), 1.0);
        assert_eq!(at(0, 0), 0.0);
        assert_eq!(at(15, 2), 0.0, "the surround left of the disc");
        assert_eq!(at(3, 15), 0.0, "the surround above the disc");
        let disc = view.iter().filter(|&&v| v == 1.0).count();
        assert!(
            (290..=330).contains(&disc),
            "{disc} pixels against pi 10^2 = 314"
        );
        Ok(())
    }

    #[test]
    fn a_photo_without_a_frame_and_a_black_image_are_in_view_everywhere() -> Result<()> {
        let photo = Tensor::full(0.5f32, (2, 3, 8, 8), &Device::Cpu)?;
        let black = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu)?;
        for images in [photo, black] {
            let view = field_of_view(&images, FIELD_OF_VIEW_THRESHOLD)?;
            assert_eq!(view.dims()[1], 1);
            assert_eq!(view.min_all()?.to_scalar::<f32>()?, 1.0);
        }
        assert!(field_of_view(&framed_disc(), 1.5).is_err());
        Ok(())
    }
}
