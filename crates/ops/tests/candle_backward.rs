//! candle's backward pass as patched in `vendor/candle-core` (vendor/README.md): a node's first
//! gradient is handed on as it is, later ones are added, subtracted ones negated. Every gradient
//! here is checked against its derivative worked out by hand.

use candle_core::{Device, Result, Tensor, Var};

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{what}[{i}]: {g} against {w}"
        );
    }
}

#[test]
fn a_value_used_twice_gets_both_gradients() -> Result<()> {
    let x = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
    // d/dx (x * x + x) = 2x + 1: the Mul's two gradients and the Add's arrive at x.
    let y = ((x.as_tensor() * x.as_tensor())? + x.as_tensor())?;
    let grads = y.sum_all()?.backward()?;
    let gx = grads.get(x.as_tensor()).expect("x has a gradient");
    assert_close(&values(gx)?, &[3.0, -3.0, 7.0], "d(x^2 + x)/dx");
    Ok(())
}

#[test]
fn subtracted_and_divided_values_get_negated_gradients() -> Result<()> {
    let a = Var::new(&[2f32, 4.0], &Device::Cpu)?;
    let b = Var::new(&[1f32, 0.5], &Device::Cpu)?;
    let (a, b) = (a.as_tensor(), b.as_tensor());
    // y = (a - b) - b + a / b: dy/da = 1 + 1/b, dy/db = -2 - a/b^2. b's first gradient arrives
    // negated into an empty entry, the later ones are subtracted from it.
    let y = (((a - b)? - b)? + (a / b)?)?;
    let grads = y.sum_all()?.backward()?;
    let ga = values(grads.get(a).expect("a has a gradient"))?;
    let gb = values(grads.get(b).expect("b has a gradient"))?;
    assert_close(&ga, &[2.0, 3.0], "dy/da");
    assert_close(&gb, &[-4.0, -18.0], "dy/db");
    Ok(())
}

#[test]
fn a_gradient_that_arrives_as_a_view_is_stored_contiguous() -> Result<()> {
    let x = Var::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu)?;
    let w = Tensor::new(&[[1f32, 10.0], [100.0, 1000.0], [0.5, 0.25]], &Device::Cpu)?;
    // The sum hands on a broadcast of its gradient and the transpose a transposed view: both
    // arrive at empty entries as views. d/dx sum(x^T * w) = w^T.
    let y = (x.as_tensor().t()? * &w)?;
    let grads = y.sum_all()?.backward()?;
    let gx = grads.get(x.as_tensor()).expect("x has a gradient");
    assert!(gx.is_contiguous(), "the stored gradient is contiguous");
    assert_eq!(gx.dims(), &[2, 3]);
    assert_close(
        &values(gx)?,
        &[1.0, 100.0, 0.5, 10.0, 1000.0, 0.25],
        "d sum(x^T w)/dx",
    );
    Ok(())
}
