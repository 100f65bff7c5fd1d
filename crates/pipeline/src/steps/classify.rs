//! The `classify` step: each image's most likely classes with their probabilities, and whether
//! the first is the image's label when it has one.

use super::{Chunk, StepContext};
use crate::error::Result;
use crate::rows::{Classified, Found, TopClass};
use crate::schema::Classify;
use candle_core::Device;

/// Runs `c` on `chunk`.
pub(crate) fn run(cx: &StepContext, c: &Classify, chunk: &Chunk) -> Result<Vec<Found>> {
    let model = cx.model;
    let probs = candle_nn::ops::softmax(&model.logits(&chunk.pixels)?, 1)?
        .to_device(&Device::Cpu)?
        .to_vec2::<f32>()?;
    let names = model.classes();
    let rows = probs
        .iter()
        .zip(chunk.items)
        .map(|(p, item)| {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let name = |k: usize| names.name(k).unwrap_or("").to_string();
            Found::Classify(Classified {
                predicted: order[0],
                name: name(order[0]),
                top: order
                    .iter()
                    .take(c.top)
                    .map(|&k| TopClass {
                        class: k,
                        name: name(k),
                        probability: p[k],
                    })
                    .collect(),
                label: item.label,
                correct: item.label.map(|label| label == order[0]),
            })
        })
        .collect();
    Ok(rows)
}
