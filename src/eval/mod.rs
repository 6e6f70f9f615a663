//! Evaluation: sample-quality distances between sample sets.

pub mod digits;
pub mod distance;
pub mod frechet;
pub mod report;
