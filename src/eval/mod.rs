//! Evaluation: sample-quality distances between sample sets.

pub mod digits;
pub mod distance;
pub mod fid;
pub mod frechet;
pub mod inception;
pub mod kid;
pub mod precision_recall;
pub mod report;
