//! Data sets as the trainer and evaluator see them: indexable collections of
//! [`Sample`]s, loaded lazily (RichHF-18K's 16K heatmap pairs do not fit in memory
//! decoded).
use crate::error::Result;
use crate::richhf::sample::Sample;

pub trait SampleSource: Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `i` (`i < len()`), decoded.
    fn get(&self, i: usize) -> Result<Sample>;
    /// Where the samples come from, for logs and errors.
    fn describe(&self) -> String;
}

/// Samples already in memory (synthetic data, tests).
pub struct InMemory {
    pub name: String,
    pub samples: Vec<Sample>,
}

impl SampleSource for InMemory {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn get(&self, i: usize) -> Result<Sample> {
        Ok(self.samples[i].clone())
    }
    fn describe(&self) -> String {
        format!("{} ({} samples in memory)", self.name, self.samples.len())
    }
}
