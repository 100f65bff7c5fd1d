//! `x * gate` for `x` of `N x C x H x W` and a gate of `N x C x 1 x 1` (squeeze-and-excitation,
//! as in EfficientNet and MobileNetV3), as one op with both gradients.
//!
//! candle's broadcast multiply computes the gate's gradient as a full-size product followed by a
//! strided reduction over the pixels, and accumulates each gradient through a zeroed tensor; here
//! the gate's gradient is one dot product per plane, in parallel over the planes.

use crate::cpu_kernels::{slice, widest_simd, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x * gate`, `gate` broadcast over the pixels of each `(image, channel)` plane; gradients
/// for both. One op on the CPU (f32, f64), candle's `broadcast_mul` elsewhere.
pub fn channel_gate(x: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let (n, c, _, _) = x.dims4()?;
    let fits = gate.dims() == [n, c, 1, 1];
    let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    if !fits || !cpu || gate.dtype() != x.dtype() || x.elem_count() == 0 {
        return x.broadcast_mul(gate);
    }
    x.contiguous()?.apply_op2(&gate.contiguous()?, Gate)
}

const WHAT: &str = "channel gate";

/// The op on `(x, gate)`.
struct Gate;

/// The pixels per plane of `x` (`N x C x P`) for a gate of `N x C` values.
fn plane<T>(x: &[T], gate: &[T]) -> Result<usize> {
    if gate.is_empty() || !x.len().is_multiple_of(gate.len()) {
        candle_core::bail!("{WHAT}: {} values for {} gates", x.len(), gate.len());
    }
    Ok(x.len() / gate.len())
}

/// Each plane of `x` times its gate.
fn scale_planes<T: Float>(x: &[T], gate: &[T]) -> Result<Vec<T>> {
    let p = plane(x, gate)?;
    let mut out = vec![T::default(); x.len()];
    out.par_chunks_mut(p)
        .zip(x.par_chunks(p).zip(gate.par_iter()))
        .for_each(|(o, (x, &g))| {
            widest_simd(
                #[inline(always)]
                || o.iter_mut().zip(x).for_each(|(o, &v)| *o = v * g),
            )
        });
    Ok(out)
}

/// Each plane's dot product of `a` and `b` (`N x C x P` each, `planes` planes).
fn plane_dots<T: Float>(a: &[T], b: &[T], planes: usize) -> Result<Vec<T>> {
    if planes == 0 || a.len() != b.len() || !a.len().is_multiple_of(planes) {
        candle_core::bail!("{WHAT} backward: {} and {} values", a.len(), b.len());
    }
    let p = a.len() / planes;
    const LANES: usize = 16;
    Ok(a.par_chunks(p)
        .zip(b.par_chunks(p))
        .map(|(a, b)| {
            widest_simd(
                #[inline(always)]
                || {
                    // Independent partial sums, so that the loop vectorises.
                    let mut acc = [T::default(); LANES];
                    let (a_rows, b_rows) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
                    let rest: T = a_rows
                        .remainder()
                        .iter()
                        .zip(b_rows.remainder())
                        .fold(T::default(), |s, (&x, &y)| s + x * y);
                    for (x, y) in a_rows.zip(b_rows) {
                        for i in 0..LANES {
                            acc[i] += x[i] * y[i];
                        }
                    }
                    acc.iter().fold(rest, |s, &v| s + v)
                },
            )
        })
        .collect())
}

impl CustomOp2 for Gate {
    fn name(&self) -> &'static str {
        "vulnmap-channel-gate"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match x.dtype() {
            DType::F32 => f32::storage(scale_planes(slice(x, xl, WHAT)?, slice(g, gl, WHAT)?)?),
            DType::F64 => f64::storage(scale_planes(slice(x, xl, WHAT)?, slice(g, gl, WHAT)?)?),
            other => candle_core::bail!("{WHAT}: f32 or f64, not {other:?}"),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gate: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x
            .track_op()
            .then(|| grad.apply_op2_no_bwd(gate, &Gate))
            .transpose()?;
        let dgate = gate
            .track_op()
            .then(|| grad.apply_op2_no_bwd(x, &PlaneDots))
            .transpose()?;
        Ok((dx, dgate))
    }
}

/// `(grad, x) -> the gate's gradient`, `N x C x 1 x 1`.
struct PlaneDots;

impl CustomOp2 for PlaneDots {
    fn name(&self) -> &'static str {
        "vulnmap-channel-gate-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, _, _) = xl.shape().dims4()?;
        let out = match g.dtype() {
            DType::F32 => {
                f32::storage(plane_dots(slice(g, gl, WHAT)?, slice(x, xl, WHAT)?, n * c)?)
            }
            DType::F64 => {
                f64::storage(plane_dots(slice(g, gl, WHAT)?, slice(x, xl, WHAT)?, n * c)?)
            }
            other => candle_core::bail!("{WHAT} backward: f32 or f64, not {other:?}"),
        };
        Ok((out, Shape::from((n, c, 1, 1))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use vulnmap_testkit::max_diff;

    /// Value and both gradients equal to candle's broadcast multiply (f64), for planes shorter
    /// and longer than the partial sums' lanes.
    #[test]
    fn equals_candles_broadcast_multiply_with_both_gradients() -> Result<()> {
        let mut rng = vulnmap_data::random::rng(21, "channel gate test");
        let dev = Device::Cpu;
        for (h, w) in [(1, 3), (7, 9), (16, 16)] {
            let mut randn = |shape: &[usize]| -> Result<Var> {
                Var::from_tensor(
                    &vulnmap_data::random::randn(&mut rng, shape, &dev)?.to_dtype(DType::F64)?,
                )
            };
            let (x, gate, probe) = (
                randn(&[2, 3, h, w])?,
                randn(&[2, 3, 1, 1])?,
                randn(&[2, 3, h, w])?,
            );
            let ours = channel_gate(x.as_tensor(), gate.as_tensor())?;
            let theirs = x.as_tensor().broadcast_mul(gate.as_tensor())?;
            assert!(max_diff(&ours, &theirs) < 1e-14, "value at {h}x{w}");
            let g1 = (&ours * probe.as_tensor())?.sum_all()?.backward()?;
            let g2 = (&theirs * probe.as_tensor())?.sum_all()?.backward()?;
            for v in [&x, &gate] {
                let (Some(a), Some(b)) = (g1.get(v.as_tensor()), g2.get(v.as_tensor())) else {
                    panic!("a gradient is missing at {h}x{w}");
                };
                assert!(max_diff(a, b) < 1e-12, "gradient at {h}x{w}");
            }
        }
        Ok(())
    }
}
