//! RichHF-18K, the paper's data set, as released: TFRecords of `tf.train.Example`s
//! (scores, heatmaps, keyword labels) joined on `filename` with the Pick-a-Pic
//! images and prompts, plus the conversion of raw point annotations to heatmaps.
pub mod dataset;
pub mod example;
pub mod pickapic;
pub mod points;
pub mod record;
pub mod sample;
pub mod synthetic;
pub mod tfrecord;

pub use sample::{Heatmap, Sample};
