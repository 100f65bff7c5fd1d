//! Batches of a dataset, decoded on the rayon pool while the model works on the previous batch.

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::image_io::{load_rgb, to_tensor};
use crate::preprocess::Preprocess;
use crate::random;
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use rayon::prelude::*;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Images and labels of a batch, on the CPU.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `N x 3 x H x W` in [0, 1].
    pub pixels: Tensor,
    /// `N` class indices (u32).
    pub labels: Tensor,
    /// Which samples of the dataset these are.
    pub indices: Vec<usize>,
}

impl Batch {
    /// The batch on `device`.
    pub fn to_device(self, device: &Device) -> Result<Self> {
        Ok(Self {
            pixels: self.pixels.to_device(device)?,
            labels: self.labels.to_device(device)?,
            indices: self.indices,
        })
    }
}

/// Makes batches of a dataset with one preprocessing.
#[derive(Debug, Clone)]
pub struct Loader {
    dataset: Arc<Dataset>,
    preprocess: Preprocess,
    batch_size: usize,
    /// Batches decoded ahead of the consumer.
    prefetch: usize,
    /// Flip images at random (left-right and up-down) in shuffled batches.
    flips: bool,
}

impl Loader {
    /// Batches of `batch_size` images (at least 1), two decoded ahead, without flips.
    pub fn new(dataset: Arc<Dataset>, preprocess: Preprocess, batch_size: usize) -> Self {
        Self {
            dataset,
            preprocess,
            batch_size: batch_size.max(1),
            prefetch: 2,
            flips: false,
        }
    }

    /// Flip each image of a shuffled batch left-right and up-down at random (the shuffle seed
    /// decides): augmentation that keeps the labels of fundus images and most natural ones.
    pub fn with_random_flips(mut self, flips: bool) -> Self {
        self.flips = flips;
        self
    }

    /// The dataset batches are drawn from.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// Batches over `indices`, in order or shuffled by `shuffle_seed`. Decoding runs on a
    /// background thread (images of a batch in parallel), up to two batches ahead.
    pub fn batches(&self, indices: &[usize], shuffle_seed: Option<u64>) -> Batches {
        let mut order = indices.to_vec();
        if let Some(seed) = shuffle_seed {
            order.shuffle(&mut random::rng(seed, "loader shuffle"));
        }
        let count = order.len().div_ceil(self.batch_size);
        let (tx, rx) = mpsc::sync_channel(self.prefetch);
        let this = self.clone();
        let flip_seed = shuffle_seed.filter(|_| self.flips);
        let worker = std::thread::spawn(move || {
            for chunk in order.chunks(this.batch_size) {
                let batch = this.load_flipped(chunk, flip_seed);
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    break; // the consumer stopped, or it has the error
                }
            }
        });
        Batches {
            rx: Some(rx),
            worker: Some(worker),
            remaining: count,
        }
    }

    /// Decodes one batch.
    pub fn load(&self, indices: &[usize]) -> Result<Batch> {
        self.load_flipped(indices, None)
    }

    /// Decodes one batch, flipping images at random when `flip_seed` is given.
    fn load_flipped(&self, indices: &[usize], flip_seed: Option<u64>) -> Result<Batch> {
        let samples: Vec<_> = indices.iter().map(|&i| &self.dataset.samples[i]).collect();
        let images: Vec<Tensor> = indices
            .par_iter()
            .map(|&i| {
                let path = &self.dataset.samples[i].path;
                let mut img = self
                    .preprocess
                    .apply(&load_rgb(path)?)
                    .map_err(|e| Error::image(path, e))?;
                if let Some(seed) = flip_seed {
                    let mut rng = random::rng(seed, &format!("flip {i}"));
                    if rng.random::<bool>() {
                        image::imageops::flip_horizontal_in_place(&mut img);
                    }
                    if rng.random::<bool>() {
                        image::imageops::flip_vertical_in_place(&mut img);
                    }
                }
                to_tensor(&img)
            })
            .collect::<Result<_>>()?;
        let pixels = stack_same_size(&images, indices, &self.dataset)?;
        let labels: Vec<u32> = samples.iter().map(|s| s.label as u32).collect();
        Ok(Batch {
            pixels,
            labels: Tensor::new(labels.as_slice(), &Device::Cpu)?,
            indices: indices.to_vec(),
        })
    }
}

fn stack_same_size(images: &[Tensor], indices: &[usize], dataset: &Dataset) -> Result<Tensor> {
    if let Some(first) = images.first() {
        for (t, &i) in images.iter().zip(indices) {
            if t.dims() != first.dims() {
                return Err(Error::image(
                    &dataset.samples[i].path,
                    format!(
                        "comes out {:?} but the batch's first image is {:?}; give a crop so all images share a size",
                        t.dims(),
                        first.dims()
                    ),
                ));
            }
        }
    }
    Ok(Tensor::stack(images, 0)?)
}

/// An iterator of batches decoded ahead.
pub struct Batches {
    rx: Option<mpsc::Receiver<Result<Batch>>>,
    worker: Option<JoinHandle<()>>,
    remaining: usize,
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.rx.as_ref()?.recv().ok();
        self.remaining = self.remaining.saturating_sub(1);
        item
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.remaining))
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        // Hang up first so a worker blocked on a full channel stops, then wait for it.
        self.rx.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
