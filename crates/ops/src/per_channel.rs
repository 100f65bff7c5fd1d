//! Per-channel arithmetic of `N x C x ...` tensors, as train-mode BatchNorm needs it: the sum over
//! every axis but the channels, and `x - v[c]`, `x * v[c]`, `x + v[c]`, with their backward
//! passes.
//!
//! candle's `sum_keepdim((0, 2, 3))`, which is also the backward of its broadcast ops, takes a
//! division and a modulo per element on one thread. These ops give the same values by the same
//! arithmetic in the same order (each channel's elements summed one after another from zero, image
//! by image), so a model trains bit for bit as with candle's ops, in parallel over the channels.
//! Other devices and dtypes get candle's ops.

use crate::cpu_kernels::{slice, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The sum of `x` (`N x C x ...`) over every axis but the channels, kept as `1 x C x 1 ...`.
pub fn channel_sum(x: &Tensor) -> Result<Tensor> {
    if fast(x) {
        x.contiguous()?.apply_op1(ChannelSum)
    } else {
        let axes: Vec<usize> = (0..x.rank()).filter(|&a| a != 1).collect();
        x.sum_keepdim(axes)
    }
}

/// `x - v[c]` for channel `c`, `v` being `1 x C x 1 ...`.
pub fn channel_sub(x: &Tensor, v: &Tensor) -> Result<Tensor> {
    binary(x, v, ChannelBinary::Sub)
}

/// `x * v[c]` for channel `c`, `v` being `1 x C x 1 ...`.
pub fn channel_mul(x: &Tensor, v: &Tensor) -> Result<Tensor> {
    binary(x, v, ChannelBinary::Mul)
}

/// `x + v[c]` for channel `c`, `v` being `1 x C x 1 ...`.
pub fn channel_add(x: &Tensor, v: &Tensor) -> Result<Tensor> {
    binary(x, v, ChannelBinary::Add)
}

fn fast(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() >= 2
}

fn binary(x: &Tensor, v: &Tensor, op: ChannelBinary) -> Result<Tensor> {
    if !fast(x) || v.dtype() != x.dtype() {
        return match op {
            ChannelBinary::Sub => x.broadcast_sub(v),
            ChannelBinary::Mul => x.broadcast_mul(v),
            ChannelBinary::Add => x.broadcast_add(v),
        };
    }
    let c = x.dim(1)?;
    let mut want = vec![1; x.rank()];
    want[1] = c;
    if v.dims() != want.as_slice() {
        candle_core::bail!(
            "per-channel {op:?}: a {want:?} tensor for input {:?}, got {:?}",
            x.dims(),
            v.dims()
        );
    }
    x.contiguous()?.apply_op2(&v.contiguous()?, op)
}

/// `(images, channels, elements per channel of one image)` of a contiguous `N x C x ...` layout.
fn geometry(l: &Layout) -> (usize, usize, usize) {
    let dims = l.dims();
    (dims[0], dims[1], dims[2..].iter().product())
}

/// Per channel, `term(i)` summed over that channel's elements `i` in memory order, from zero.
fn sum_per_channel<T: Float>(
    (n, c, plane): (usize, usize, usize),
    term: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut acc = T::default();
            for image in 0..n {
                let start = (image * c + ch) * plane;
                for i in start..start + plane {
                    acc += term(i);
                }
            }
            acc
        })
        .collect()
}

/// The channel sum's output shape: `1 x C x 1 ...`.
fn kept(l: &Layout) -> Shape {
    let mut dims = vec![1; l.dims().len()];
    dims[1] = l.dims()[1];
    Shape::from(dims)
}

struct ChannelSum;

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "vulnmap-channel-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            let x = slice::<T>(s, l, "channel sum")?;
            Ok(T::storage(sum_per_channel(geometry(l), |i| x[i])))
        }
        let out = match s.dtype() {
            DType::F32 => run::<f32>(s, l)?,
            DType::F64 => run::<f64>(s, l)?,
            other => candle_core::bail!("channel sum: f32 or f64, not {other:?}"),
        };
        Ok((out, kept(l)))
    }

    /// Each element's gradient is its channel's (candle's sum backward: a broadcast).
    fn bwd(&self, x: &Tensor, _sum: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.broadcast_as(x.shape())?))
    }
}

#[derive(Debug, Clone, Copy)]
enum ChannelBinary {
    Sub,
    Mul,
    Add,
}

impl ChannelBinary {
    fn apply<T: Float>(self, x: &[T], v: &[T], (_, c, plane): (usize, usize, usize)) -> Vec<T> {
        let mut out = vec![T::default(); x.len()];
        out.par_chunks_mut(plane.max(1))
            .zip(x.par_chunks(plane.max(1)))
            .enumerate()
            .for_each(|(row, (o, x))| {
                let v = v[row % c];
                match self {
                    ChannelBinary::Sub => o.iter_mut().zip(x).for_each(|(o, &x)| *o = x - v),
                    ChannelBinary::Mul => o.iter_mut().zip(x).for_each(|(o, &x)| *o = x * v),
                    ChannelBinary::Add => o.iter_mut().zip(x).for_each(|(o, &x)| *o = x + v),
                }
            });
        out
    }
}

impl CustomOp2 for ChannelBinary {
    fn name(&self) -> &'static str {
        "vulnmap-channel-binary"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            op: ChannelBinary,
            xs: &CpuStorage,
            xl: &Layout,
            vs: &CpuStorage,
            vl: &Layout,
        ) -> Result<CpuStorage> {
            let x = slice::<T>(xs, xl, "per-channel op")?;
            let v = slice::<T>(vs, vl, "per-channel op")?;
            Ok(T::storage(op.apply(x, v, geometry(xl))))
        }
        let out = match xs.dtype() {
            DType::F32 => run::<f32>(*self, xs, xl, vs, vl)?,
            DType::F64 => run::<f64>(*self, xs, xl, vs, vl)?,
            other => candle_core::bail!("per-channel op: f32 or f64, not {other:?}"),
        };
        Ok((out, xl.shape().clone()))
    }

    /// candle's gradients of `x op broadcast(v)`: `v`'s is the channel sum of what its broadcast
    /// received (`0 - g` for a subtraction, `g x` for a product, `g` for a sum), `x`'s is `g`, or
    /// `g v` for a product.
    fn bwd(
        &self,
        x: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let grad_x = match self {
            ChannelBinary::Mul => grad.apply_op2_no_bwd(&v.detach(), &ChannelBinary::Mul)?,
            ChannelBinary::Sub | ChannelBinary::Add => grad.clone(),
        };
        let grad_v = grad.apply_op2_no_bwd(&x.detach(), &ChannelGrad(*self))?;
        Ok((Some(grad_x), Some(grad_v)))
    }
}

/// `(grad, x) -> v`'s gradient, `1 x C x 1 ...`.
struct ChannelGrad(ChannelBinary);

impl CustomOp2 for ChannelGrad {
    fn name(&self) -> &'static str {
        "vulnmap-channel-binary-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            op: ChannelBinary,
            gs: &CpuStorage,
            gl: &Layout,
            xs: &CpuStorage,
            xl: &Layout,
        ) -> Result<CpuStorage> {
            let g = slice::<T>(gs, gl, "per-channel op backward")?;
            let x = slice::<T>(xs, xl, "per-channel op backward")?;
            let geometry = geometry(gl);
            let sums = match op {
                ChannelBinary::Sub => sum_per_channel(geometry, |i| T::default() - g[i]),
                ChannelBinary::Mul => sum_per_channel(geometry, |i| g[i] * x[i]),
                ChannelBinary::Add => sum_per_channel(geometry, |i| g[i]),
            };
            Ok(T::storage(sums))
        }
        if gl.shape() != xl.shape() {
            candle_core::bail!(
                "per-channel op backward: gradient {:?} for {:?}",
                gl.dims(),
                xl.dims()
            );
        }
        let out = match gs.dtype() {
            DType::F32 => run::<f32>(self.0, gs, gl, xs, xl)?,
            DType::F64 => run::<f64>(self.0, gs, gl, xs, xl)?,
            other => candle_core::bail!("per-channel op backward: f32 or f64, not {other:?}"),
        };
        Ok((out, kept(gl)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// Values and gradients equal to candle's broadcast ops and `sum_keepdim`, to the bit.
    #[test]
    fn equal_to_candles_ops_bit_for_bit_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0.3f32, 2.0, (3, 5, 7, 6), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 5, 1, 1), &dev)?)?;
        let upstream = Tensor::randn(0f32, 1.0, (3, 5, 7, 6), &dev)?;
        type Ours = fn(&Tensor, &Tensor) -> Result<Tensor>;
        let cases: [(Ours, Ours); 3] = [
            (channel_sub, |a, b| a.broadcast_sub(b)),
            (channel_mul, |a, b| a.broadcast_mul(b)),
            (channel_add, |a, b| a.broadcast_add(b)),
        ];
        for (ours, candles) in cases {
            // The op, then a channel sum, as train-mode BatchNorm chains them.
            let run = |f: Ours, sum: bool| -> Result<(Tensor, Tensor, Tensor)> {
                let y = f(x.as_tensor(), v.as_tensor())?;
                let s = if sum {
                    channel_sum(&y.sqr()?)?
                } else {
                    y.sqr()?.sum_keepdim((0, 2, 3))?
                };
                let loss = ((&y * &upstream)?.sum_all()? + s.sum_all()?)?;
                let grads = loss.backward()?;
                Ok((
                    y,
                    grads.get(x.as_tensor()).unwrap().clone(),
                    grads.get(v.as_tensor()).unwrap().clone(),
                ))
            };
            let (y1, gx1, gv1) = run(ours, true)?;
            let (y2, gx2, gv2) = run(candles, false)?;
            assert_eq!(bits(&y1), bits(&y2));
            assert_eq!(bits(&gx1), bits(&gx2));
            assert_eq!(bits(&gv1), bits(&gv2));
        }
        assert_eq!(
            bits(&channel_sum(x.as_tensor())?),
            bits(&x.sum_keepdim((0, 2, 3))?)
        );
        Ok(())
    }

    #[test]
    fn a_value_per_channel_is_required() {
        let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let v = Tensor::zeros((1, 4, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let err = channel_mul(&x, &v).unwrap_err().to_string();
        assert!(err.contains("[1, 3, 1, 1]"), "{err}");
    }
}
