//! The `classify` step: each image's most likely classes with their probabilities, and whether
//! the first is the image's label when it has one.

use super::{Chunk, Rows, StepContext};
use crate::error::Result;
use crate::schema::Classify;
use candle_core::Device;
use serde_json::{json, Map, Value};

/// Runs `c` on `chunk`.
pub(crate) fn run(cx: &StepContext, c: &Classify, chunk: &Chunk) -> Result<Rows> {
    let model = cx.model;
    let probs = candle_nn::ops::softmax(&model.forward(&chunk.pixels)?, 1)?
        .to_device(&Device::Cpu)?
        .to_vec2::<f32>()?;
    let names = model.classes();
    let rows = probs
        .iter()
        .zip(chunk.items)
        .map(|(p, item)| {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let top: Vec<Value> = order
                .iter()
                .take(c.top)
                .map(|&k| {
                    json!({"class": k, "name": names.name(k).unwrap_or(""), "probability": p[k]})
                })
                .collect();
            let mut data = Map::new();
            data.insert("predicted".into(), json!(order[0]));
            data.insert("name".into(), json!(names.name(order[0]).unwrap_or("")));
            data.insert("top".into(), Value::Array(top));
            if let Some(label) = item.label {
                data.insert("label".into(), json!(label));
                data.insert("correct".into(), json!(label == order[0]));
            }
            data
        })
        .collect();
    Ok(rows)
}
