//! Finite-difference checks of input gradients, for custom ops and whole models alike.
//!
//! The analytic gradient of `sum(f(x) * r)` (with `r` a fixed random projection, so every output
//! counts with its own weight) is compared with central differences `(L(x + e) - L(x - e)) / 2e`
//! at each input element. Run it in f64 on small inputs.

use candle_core::{DType, Result, Tensor, Var};

/// How far the analytic gradient is from central differences.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradCheck {
    /// The largest absolute difference over the checked elements.
    pub max_abs_error: f64,
    /// The largest |analytic| over the checked elements, for scale.
    pub max_abs_gradient: f64,
    /// How many input elements were perturbed.
    pub checked: usize,
}

/// Compares `f`'s analytic input gradient with central differences of step `eps` at up to
/// `max_points` input elements (evenly spread). `x` must be f64.
pub fn gradient_error<F>(x: &Tensor, f: F, eps: f64, max_points: usize) -> Result<GradCheck>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    if x.dtype() != DType::F64 {
        candle_core::bail!(
            "finite-difference checks need f64 inputs, got {:?}",
            x.dtype()
        );
    }
    let shape = x.shape().clone();
    let device = x.device().clone();
    let var = Var::from_tensor(&x.detach().copy()?)?;
    let y = f(var.as_tensor())?;
    // A fixed projection with distinct weights, so the check covers the whole Jacobian.
    let n_out = y.elem_count();
    let proj: Vec<f64> = (0..n_out)
        .map(|i| 0.5 + ((i * 7919) % 101) as f64 / 101.0)
        .collect();
    let proj = Tensor::from_vec(proj, y.shape(), &device)?;
    let loss = |t: &Tensor| -> Result<f64> { (f(t)? * &proj)?.sum_all()?.to_scalar::<f64>() };
    let grads = (y * &proj)?.sum_all()?.backward()?;
    let analytic = match grads.get(var.as_tensor()) {
        Some(g) => g.flatten_all()?.to_vec1::<f64>()?,
        None => vec![0.0; shape.elem_count()],
    };
    let base = x.flatten_all()?.to_vec1::<f64>()?;
    let step = (base.len() / max_points.max(1)).max(1);
    let mut report = GradCheck {
        max_abs_error: 0.0,
        max_abs_gradient: 0.0,
        checked: 0,
    };
    for i in (0..base.len()).step_by(step) {
        let mut plus = base.clone();
        plus[i] += eps;
        let mut minus = base.clone();
        minus[i] -= eps;
        let lp = loss(&Tensor::from_vec(plus, &shape, &device)?)?;
        let lm = loss(&Tensor::from_vec(minus, &shape, &device)?)?;
        let numeric = (lp - lm) / (2.0 * eps);
        report.max_abs_error = report.max_abs_error.max((numeric - analytic[i]).abs());
        report.max_abs_gradient = report.max_abs_gradient.max(analytic[i].abs());
        report.checked += 1;
    }
    Ok(report)
}

/// Fails unless `f`'s gradient is within `tol * max(1, max |gradient|)` of central differences
/// at every element of `x`.
pub fn finite_difference_check<F>(x: &Tensor, f: F, eps: f64, tol: f64) -> Result<GradCheck>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    let report = gradient_error(x, f, eps, usize::MAX)?;
    if report.max_abs_error > tol * report.max_abs_gradient.max(1.0) {
        candle_core::bail!(
            "gradient differs from finite differences: {report:?} (tolerance {tol})"
        );
    }
    Ok(report)
}
